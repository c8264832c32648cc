"""Episode-aware replay: whole episodes in a preallocated ring, `[T+1, B]` slice samples.

The sampler follows the role of TorchRL's `SliceSampler` (slices that never cross an
episode boundary) but keeps its per-call cost independent of the buffer size: it draws
candidate rows uniformly and accepts those with at least T rows of the same episode after
them (rejection sampling), instead of scanning episode boundaries (pytorch/rl#2669).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterator

import torch
from tensordict import TensorDict

from rlcore import checks
from rlcore.registry import register
from rlcore.types import ACTION, EPISODE, OBS, REWARD, TERMINATED, EnvSpec

_KEYS = (OBS, ACTION, REWARD, TERMINATED, EPISODE)
_STATE_VERSION = 1


@register("replay")
class EpisodeSliceBuffer:
    """Stores whole episodes and samples slices of `horizon + 1` consecutive rows.

    TD-MPC2 (Hansen et al., 2024, Sec. 3 and App. A) trains on length-(H+1) sub-trajectories
    drawn uniformly from replay; a slice must stay inside one episode, and a partially
    collected episode must never be sampled, so episodes are added only once complete.

    Arrival convention: row t of an episode holds `obs_t` together with the action and
    reward that *led to* it, and `terminated_t` says whether `obs_t` is terminal. Row 0 (the
    first observation) has NaN action and reward. In a sample, row 0's action and reward are
    kept as stored (possibly NaN) and are never read by losses, which slice `[1:]`.

    Storage: a ring of `capacity` ROWS (one row per observation, first observations
    included). Episodes are written contiguously (possibly wrapping around the end of the
    ring); when space is needed the oldest episodes are dropped whole.

    Sampling: rejection sampling. Candidate rows are drawn uniformly among stored rows and
    a candidate is accepted when at least `horizon` rows of its own episode follow it. The
    accepted starts are i.i.d. uniform over all valid start positions, and the expected
    work per call is O(B / acceptance rate), independent of capacity and of the number of
    stored episodes. Episodes with fewer than `horizon + 1` rows are stored (and exported)
    but contribute no start.

    `len(buffer)` counts stored rows (observations); `num_transitions` counts rows minus
    one first-observation row per episode.

    Args:
        spec: observation shape, action dimension and observation type (`pixels` are
            stored as uint8, everything else as float32).
        capacity: number of rows the ring holds.
        batch_size: default B for `sample()`.
        horizon: T, the number of transitions per slice (slices have T+1 rows).
        seed: seed of the private generator behind all sampling randomness.
        device: where sampled batches are returned.
        storage_device: where the ring lives.

    Shapes:
        add: TensorDict[n+1] with obs [n+1, *obs_shape], action [n+1, A], reward [n+1],
            terminated [n+1] (bool), episode [n+1] (int64, constant within the episode).
        sample: TensorDict[T+1, B] with obs [T+1, B, *obs_shape], action [T+1, B, A],
            reward [T+1, B], terminated [T+1, B], episode [T+1, B].
    """

    def __init__(
        self,
        spec: EnvSpec,
        *,
        capacity: int = 1_000_000,
        batch_size: int = 256,
        horizon: int = 3,
        seed: int = 0,
        device: str | torch.device = "cpu",
        storage_device: str | torch.device = "cpu",
    ) -> None:
        owner = type(self).__name__
        capacity = checks.integer(owner, "capacity", capacity, at_least=1)
        batch_size = checks.integer(owner, "batch_size", batch_size, at_least=1)
        horizon = checks.integer(owner, "horizon", horizon, at_least=0)
        self.spec = spec
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.horizon = int(horizon)
        self.device = torch.device(device)
        self.storage_device = torch.device(storage_device)
        self._obs_shape = tuple(spec.obs_shape)
        self._obs_dtype = torch.uint8 if spec.obs_type == "pixels" else torch.float32
        self._action_dim = int(spec.action_dim)

        # Preallocated ring; `torch.empty` leaves untouched pages unallocated until written.
        c, dev = self.capacity, self.storage_device
        self._storage = TensorDict(
            {
                OBS: torch.empty((c, *self._obs_shape), dtype=self._obs_dtype, device=dev),
                ACTION: torch.empty((c, self._action_dim), dtype=torch.float32, device=dev),
                REWARD: torch.empty((c,), dtype=torch.float32, device=dev),
                TERMINATED: torch.zeros((c,), dtype=torch.bool, device=dev),
                EPISODE: torch.full((c,), -1, dtype=torch.int64, device=dev),
            },
            batch_size=[c],
            device=dev,
        )
        # Per-row count of rows of the same episode that follow it (-1 for empty rows).
        # Kept on CPU next to the generator so acceptance tests never touch the ring.
        self._remaining = torch.full((c,), -1, dtype=torch.int64)  # [C]
        # Stored episodes, oldest first, as (first row in the ring, number of rows).
        self._episodes: deque[tuple[int, int]] = deque()
        self._tail = 0  # ring row of the oldest stored row
        self._size = 0  # stored rows
        self._num_valid_starts = 0  # sum over stored episodes of max(0, rows - horizon)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        # Diagnostics of the last `sample()` call (tests assert these stay small).
        self._last_num_rounds = 0
        self._last_num_candidates = 0

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Number of stored rows (observations, first observations included)."""
        return self._size

    @property
    def bytes_per_row(self) -> int:
        """Storage bytes of one stored row (observation, action, reward, flags, episode id)."""
        return sum(t.element_size() * t[0].numel() for t in self._storage.values())

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_transitions(self) -> int:
        """Stored rows minus one first-observation row per episode."""
        return self._size - len(self._episodes)

    @property
    def num_valid_starts(self) -> int:
        """Number of rows a slice can start from."""
        return self._num_valid_starts

    @property
    def _ptr(self) -> int:
        """Ring row the next episode is written to."""
        return (self._tail + self._size) % self.capacity

    # ------------------------------------------------------------------ writing
    def add(self, episode: TensorDict) -> None:
        """Append one complete episode, dropping the oldest episodes whole if needed."""
        rows = self._validate(episode)  # dict of [n+1, ...] tensors on storage_device
        n = rows[OBS].shape[0]

        # Make room: drop oldest episodes until n rows are free.
        while self.capacity - self._size < n:
            start, length = self._episodes.popleft()
            self._remaining[self._ring(start, length)] = -1  # [length]
            self._tail = (start + length) % self.capacity
            self._size -= length
            self._num_valid_starts -= max(0, length - self.horizon)
        if self._size == 0:
            self._tail = 0

        # Write contiguously from the write pointer (may wrap around the ring's end).
        start = self._ptr
        idx = self._ring(start, n)  # [n]
        self._storage[idx.to(self.storage_device)] = TensorDict(rows, batch_size=[n])
        self._remaining[idx] = torch.arange(n - 1, -1, -1, dtype=torch.int64)  # [n]
        self._episodes.append((start, n))
        self._size += n
        self._num_valid_starts += max(0, n - self.horizon)

    def _ring(self, start: int, length: int) -> torch.Tensor:
        """Ring rows `start, ..., start + length - 1` (mod capacity) as an index [length]."""
        return (start + torch.arange(length, dtype=torch.int64)) % self.capacity  # [length]

    def _validate(self, episode: TensorDict) -> dict[str, torch.Tensor]:
        """Check keys and shapes of one episode and cast it to the storage dtypes."""
        if not isinstance(episode, TensorDict):
            raise TypeError(f"add() expects a TensorDict, got {type(episode).__name__}")
        missing = [k for k in _KEYS if k not in episode.keys()]
        if missing:
            raise KeyError(
                f"episode is missing keys {missing}; expected {list(_KEYS)} "
                "(see rlcore.types)"
            )
        if episode.batch_dims != 1:
            raise ValueError(
                f"episode must have batch_size [n+1], got {list(episode.batch_size)}"
            )
        n = episode.batch_size[0]
        if n < 1:
            raise ValueError("episode has no rows")
        if n > self.capacity:
            raise ValueError(
                f"episode has {n} rows but the buffer capacity is {self.capacity} rows; "
                "increase capacity"
            )
        expected = {
            OBS: (n, *self._obs_shape),
            ACTION: (n, self._action_dim),
            REWARD: (n,),
            TERMINATED: (n,),
            EPISODE: (n,),
        }
        dtypes = {
            OBS: self._obs_dtype,
            ACTION: torch.float32,
            REWARD: torch.float32,
            TERMINATED: torch.bool,
            EPISODE: torch.int64,
        }
        rows = {}
        for key, shape in expected.items():
            value = episode.get(key)
            if value.ndim == len(shape) + 1 and value.shape[-1] == 1 and len(shape) == 1:
                value = value.squeeze(-1)  # [n+1, 1] -> [n+1]
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"episode[{key!r}] has shape {tuple(value.shape)}, expected {shape}"
                )
            rows[key] = value.to(device=self.storage_device, dtype=dtypes[key])
        ids = rows[EPISODE]
        if not bool((ids == ids[0]).all()):
            raise ValueError(f"episode[{EPISODE!r}] must be constant within one episode")
        return rows

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int | None = None) -> TensorDict:
        """Draw B slices of T+1 consecutive rows, each inside one episode.

        Shapes: returns TensorDict[T+1, B] (time-major) on `device`.
        """
        b = self.batch_size if batch_size is None else int(batch_size)
        starts = self._sample_starts(b)  # [B] ring rows
        steps = torch.arange(self.horizon + 1, dtype=torch.int64)  # [T+1]
        idx = (starts.unsqueeze(0) + steps.unsqueeze(1)) % self.capacity  # [T+1, B]
        batch = self._storage[idx.to(self.storage_device)]  # TensorDict[T+1, B]
        return batch.to(self.device)

    def _sample_starts(self, b: int) -> torch.Tensor:
        """Uniform valid start rows by vectorized rejection sampling.

        Cost per call is O(b / p) with p = valid starts / stored rows, and never depends on
        capacity or on the number of stored episodes.

        Shapes: returns [b] int64 ring rows.
        """
        if self._num_valid_starts == 0:
            raise RuntimeError(
                f"no episode in the buffer has at least horizon+1={self.horizon + 1} rows; "
                "add longer episodes before sampling"
            )
        accept_rate = self._num_valid_starts / self._size
        accepted: list[torch.Tensor] = []
        need, rounds, candidates = b, 0, 0
        while need > 0:
            rounds += 1
            if rounds > 1000:
                raise RuntimeError("rejection sampling did not converge")
            # Oversample so one round almost always suffices.
            num = min(math.ceil(1.25 * need / accept_rate) + 16, 1 << 24)
            offsets = torch.randint(
                self._size, (num,), generator=self._generator, dtype=torch.int64
            )  # [num] logical positions, oldest row = 0
            rows = (self._tail + offsets) % self.capacity  # [num]
            ok = rows[self._remaining[rows] >= self.horizon]  # [num_accepted]
            accepted.append(ok[:need])
            need -= accepted[-1].numel()
            candidates += num
        self._last_num_rounds, self._last_num_candidates = rounds, candidates
        return torch.cat(accepted)  # [b]

    # ------------------------------------------------------------------ export
    def episodes(self) -> Iterator[TensorDict]:
        """Yield stored episodes oldest first, each a TensorDict[n+1] on `storage_device`."""
        for start, length in list(self._episodes):
            yield self._storage[self._ring(start, length).to(self.storage_device)]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Filled rows in logical order (oldest first), episode lengths and generator state.

        The ring is normalized on save: the oldest row goes to ring row 0, so the write
        pointer is `len(self) % capacity`. Sampling works on logical positions, so a loaded
        buffer draws exactly the samples the saved one would have drawn next.
        """
        idx = self._ring(self._tail, self._size).to(self.storage_device)  # [size]
        rows = {k: v.cpu() for k, v in self._storage[idx].items()}  # each [size, ...]
        lengths = torch.tensor([n for _, n in self._episodes], dtype=torch.int64)  # [E]
        return {
            "version": _STATE_VERSION,
            "capacity": self.capacity,
            "rows": rows,
            "episode_lengths": lengths,
            "write_pointer": self._size % self.capacity,
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lengths = state["episode_lengths"].to(torch.int64)  # [E]
        size = int(lengths.sum())
        if size > self.capacity:
            raise ValueError(f"state holds {size} rows but capacity is {self.capacity}")
        rows = state["rows"]
        missing = [k for k in _KEYS if k not in rows]
        if missing:
            raise KeyError(f"replay state is missing rows {missing}")
        if tuple(rows[OBS].shape[1:]) != self._obs_shape:
            raise ValueError(
                f"replay state has obs shape {tuple(rows[OBS].shape[1:])}, "
                f"buffer expects {self._obs_shape}"
            )

        # Place rows at ring rows 0..size-1, oldest first.
        self._storage[:size] = TensorDict(
            {k: rows[k].to(self.storage_device) for k in _KEYS}, batch_size=[size]
        )
        # Per-row remaining counts from episode ends, fully vectorized.
        ends = torch.cumsum(lengths, 0)  # [E]
        row_episode = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [size]
        self._remaining.fill_(-1)
        self._remaining[:size] = ends[row_episode] - 1 - torch.arange(size)  # [size]
        starts = (ends - lengths).tolist()
        self._episodes = deque(zip(starts, lengths.tolist()))
        self._tail = 0
        self._size = size
        self._num_valid_starts = int((lengths - self.horizon).clamp(min=0).sum())
        self._generator.set_state(state["generator_state"])
