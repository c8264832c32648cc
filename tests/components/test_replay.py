"""EpisodeSliceBuffer: episode-safe slices, arrival convention, wrap-around, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDict

from components.replay.episodic import EpisodeSliceBuffer
from rlcore.registry import registered
from rlcore.types import ACTION, EPISODE, OBS, REWARD, TERMINATED, EnvSpec, ReplayBuffer

OBS_DIM, ACT_DIM = 3, 2
SPEC = EnvSpec(obs_shape=(OBS_DIM,), action_dim=ACT_DIM, episode_length=1000)


def make_episode(ep_id: int, num_rows: int, terminated: bool = False) -> TensorDict:
    """An episode whose rows encode (episode id, t) so alignment can be checked.

    obs_t = 1000 * ep_id + t in every feature; action_t = t; reward_t = t + 0.5; row 0 has
    NaN action and reward (arrival convention).

    Shapes: TensorDict[num_rows].
    """
    t = torch.arange(num_rows, dtype=torch.float32)  # [n+1]
    obs = (1000.0 * ep_id + t).unsqueeze(-1).expand(num_rows, OBS_DIM).clone()  # [n+1, D]
    action = t.unsqueeze(-1).expand(num_rows, ACT_DIM).clone()  # [n+1, A]
    reward = t + 0.5  # [n+1]
    action[0] = float("nan")
    reward[0] = float("nan")
    term = torch.zeros(num_rows, dtype=torch.bool)
    term[-1] = terminated
    return TensorDict(
        {
            OBS: obs,
            ACTION: action,
            REWARD: reward,
            TERMINATED: term,
            EPISODE: torch.full((num_rows,), ep_id, dtype=torch.int64),
        },
        batch_size=[num_rows],
    )


def make_buffer(**kwargs) -> EpisodeSliceBuffer:
    kwargs.setdefault("capacity", 200)
    kwargs.setdefault("batch_size", 64)
    kwargs.setdefault("horizon", 3)
    return EpisodeSliceBuffer(SPEC, **kwargs)


def fill(buf: EpisodeSliceBuffer, lengths: list[int], first_id: int = 0) -> None:
    for i, n in enumerate(lengths):
        buf.add(make_episode(first_id + i, n))


def same(a: TensorDict, b: TensorDict) -> bool:
    """Exact equality of two batches, NaN (row-0 action/reward) equal to NaN."""
    if a.batch_size != b.batch_size or set(a.keys()) != set(b.keys()):
        return False
    return all(torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0))
               if a[k].is_floating_point() else torch.equal(a[k], b[k]) for k in a.keys())


def check_slices(batch: TensorDict, horizon: int) -> None:
    """Every slice lies inside one episode and its rows are consecutive and aligned."""
    assert batch.batch_size == torch.Size([horizon + 1, batch.batch_size[1]])
    ep = batch[EPISODE]  # [T+1, B]
    assert (ep == ep[:1]).all(), "a slice crosses an episode boundary"
    obs = batch[OBS][..., 0]  # [T+1, B]
    t = obs - 1000.0 * ep  # [T+1, B] step index within the episode
    assert torch.equal(t[1:] - t[:-1], torch.ones_like(t[1:]))
    # Arrival convention: row t carries the action and reward that led to obs_t.
    assert torch.equal(batch[ACTION][1:], t[1:].unsqueeze(-1).expand(-1, -1, ACT_DIM))
    assert torch.equal(batch[REWARD][1:], t[1:] + 0.5)
    # Row 0 is kept as stored: NaN exactly where the slice starts at an episode's first obs.
    assert torch.equal(batch[ACTION][0].isnan().all(-1), t[0] == 0)
    assert torch.equal(batch[REWARD][0].isnan(), t[0] == 0)


def test_registered_and_protocol():
    assert registered("replay")["EpisodeSliceBuffer"] is EpisodeSliceBuffer
    assert isinstance(make_buffer(), ReplayBuffer)


def test_bytes_per_row_counts_every_stored_field():
    # obs float32 x3, action float32 x2, reward float32, terminated bool, episode int64
    assert make_buffer().bytes_per_row == 4 * OBS_DIM + 4 * ACT_DIM + 4 + 1 + 8
    pixels = EnvSpec(obs_shape=(3, 8, 8), action_dim=1, episode_length=10, obs_type="pixels")
    assert EpisodeSliceBuffer(pixels, capacity=10).bytes_per_row == 3 * 8 * 8 + 4 + 4 + 1 + 8


def test_slices_never_cross_episodes_and_align():
    buf = make_buffer(capacity=500, batch_size=256, horizon=3)
    lengths = [1, 2, 3, 4, 5, 9, 17, 4, 1, 30, 2, 6]
    fill(buf, lengths)
    assert len(buf) == sum(lengths)
    assert buf.num_episodes == len(lengths)
    assert buf.num_transitions == sum(lengths) - len(lengths)
    assert buf.num_valid_starts == sum(max(0, n - 3) for n in lengths)
    saw_first = False
    for _ in range(20):
        batch = buf.sample()
        check_slices(batch, 3)
        assert batch[OBS].dtype == torch.float32
        assert batch[TERMINATED].dtype == torch.bool
        assert batch[EPISODE].dtype == torch.int64
        # Episodes with fewer than horizon+1 rows contribute no slice.
        assert not torch.isin(batch[EPISODE][0], torch.tensor([0, 1, 2, 8, 10])).any()
        saw_first |= bool((batch[OBS][0, :, 0] % 1000 == 0).any())
    assert saw_first, "an episode's first observation was never sampled at t=0"


def test_sample_batch_size_override_and_default():
    buf = make_buffer(batch_size=7)
    fill(buf, [10, 12])
    assert buf.sample().batch_size == torch.Size([4, 7])
    assert buf.sample(5).batch_size == torch.Size([4, 5])
    assert buf.sample(5)[OBS].shape == (4, 5, OBS_DIM)
    assert buf.sample(5)[ACTION].shape == (4, 5, ACT_DIM)


def test_horizon_zero_and_full_length_slices():
    buf = make_buffer(horizon=0, batch_size=32)
    fill(buf, [1, 1])
    check_slices(buf.sample(), 0)
    buf = make_buffer(horizon=5, batch_size=32)
    fill(buf, [6])  # exactly one valid start
    batch = buf.sample()
    check_slices(batch, 5)
    assert (batch[OBS][0, :, 0] == 0).all()


def test_wraparound_drops_oldest_whole():
    capacity = 50
    buf = make_buffer(capacity=capacity, batch_size=128, horizon=3)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 21, (300,), generator=gen).tolist()
    for i, n in enumerate(lengths):
        buf.add(make_episode(i, n))
        # The stored episodes are the longest suffix of those added that fits.
        kept, total = [], 0
        for j in range(i, -1, -1):
            if total + lengths[j] > capacity:
                break
            kept.append(j)
            total += lengths[j]
        kept.reverse()
        stored = list(buf.episodes())
        assert [int(e[EPISODE][0]) for e in stored] == kept
        assert len(buf) == total <= capacity
        for e in stored:  # whole episodes, content intact
            assert same(e, make_episode(int(e[EPISODE][0]), e.batch_size[0]))
        if buf.num_valid_starts > 0 and i % 10 == 0:
            check_slices(buf.sample(), 3)
    # Many wraps happened.
    assert sum(lengths) > 20 * capacity


def test_uniform_over_valid_starts():
    buf = make_buffer(capacity=30, batch_size=4000, horizon=2, seed=3)
    fill(buf, [3, 5, 1, 8, 2])  # wraps never; valid starts: 1 + 3 + 0 + 6 + 0 = 10
    counts: dict[tuple[int, int], int] = {}
    num_draws = 0
    for _ in range(10):
        batch = buf.sample()
        keys = torch.stack([batch[EPISODE][0], batch[OBS][0, :, 0].long() % 1000], -1)
        for (e, t), c in zip(*torch.unique(keys, dim=0, return_counts=True)):
            counts[(int(e), int(t))] = counts.get((int(e), int(t)), 0) + int(c)
        num_draws += batch.batch_size[1]
    expected_starts = {(0, 0)} | {(1, t) for t in range(3)} | {(3, t) for t in range(6)}
    assert set(counts) == expected_starts
    expected = num_draws / len(expected_starts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 35.0  # 9 degrees of freedom; p ~ 1e-4


def test_uniform_after_wrap():
    buf = make_buffer(capacity=20, batch_size=4000, horizon=1, seed=5)
    fill(buf, [9, 9, 9, 5])  # the first two are dropped; the last wraps around the ring end
    assert [int(e[EPISODE][0]) for e in buf.episodes()] == [2, 3]
    batch = buf.sample()
    check_slices(batch, 1)
    starts = batch[EPISODE][0] * 100 + batch[OBS][0, :, 0].long() % 1000
    _, counts = torch.unique(starts, return_counts=True)
    assert counts.numel() == 8 + 4
    expected = 4000 / 12
    assert ((counts - expected).abs() < 0.25 * expected).all()


def test_state_dict_round_trip():
    buf = make_buffer(capacity=60, batch_size=32, horizon=3, seed=11)
    fill(buf, [10, 25, 4, 17, 13])  # wraps: the first two episodes are dropped
    buf.sample()
    state = buf.state_dict()
    # Compact: only filled rows are saved.
    assert state["rows"][OBS].shape[0] == len(buf) < buf.capacity
    # Survives serialization with weights_only loading.
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)

    other = make_buffer(capacity=60, batch_size=32, horizon=3, seed=999)
    other.load_state_dict(state)
    assert len(other) == len(buf)
    assert other.num_episodes == buf.num_episodes
    assert other.num_valid_starts == buf.num_valid_starts
    for _ in range(3):
        assert same(buf.sample(), other.sample())
    # Identical after further adds (eviction of the same episodes).
    for b in (buf, other):
        fill(b, [12, 30], first_id=100)
    assert [int(e[EPISODE][0]) for e in buf.episodes()] == [
        int(e[EPISODE][0]) for e in other.episodes()
    ]
    for _ in range(3):
        a, b = buf.sample(), other.sample()
        assert same(a, b)
        check_slices(a, 3)


def test_state_dict_full_buffer():
    buf = make_buffer(capacity=40, batch_size=16, horizon=2, seed=2)
    fill(buf, [20, 20])
    assert len(buf) == buf.capacity
    other = make_buffer(capacity=40, batch_size=16, horizon=2)
    other.load_state_dict(buf.state_dict())
    assert same(buf.sample(), other.sample())


def test_determinism_for_fixed_seed():
    a, b, c = make_buffer(seed=4), make_buffer(seed=4), make_buffer(seed=5)
    for buf in (a, b, c):
        fill(buf, [7, 12, 3, 20])
    sa, sb, sc = a.sample(), b.sample(), c.sample()
    assert same(sa, sb)
    assert not same(sa, sc)


def test_errors():
    buf = make_buffer(capacity=10)
    with pytest.raises(ValueError, match="capacity"):
        buf.add(make_episode(0, 11))
    bad = make_episode(0, 5)
    del bad[REWARD]
    with pytest.raises(KeyError, match="reward"):
        buf.add(bad)
    wrong = make_episode(0, 5)
    wrong[OBS] = torch.zeros(5, OBS_DIM + 1)
    with pytest.raises(ValueError, match="obs"):
        buf.add(wrong)
    mixed = make_episode(0, 5)
    mixed[EPISODE][2] = 7
    with pytest.raises(ValueError, match="constant"):
        buf.add(mixed)
    with pytest.raises(TypeError):
        buf.add({OBS: torch.zeros(5, OBS_DIM)})
    assert len(buf) == 0
    buf.add(make_episode(0, 3))  # shorter than horizon+1: stored, not sampleable
    assert len(buf) == 3 and buf.num_episodes == 1
    with pytest.raises(RuntimeError, match="horizon"):
        buf.sample()


def test_pixels_stored_as_uint8():
    spec = EnvSpec(obs_shape=(3, 4, 4), action_dim=1, episode_length=10, obs_type="pixels")
    buf = EpisodeSliceBuffer(spec, capacity=30, batch_size=8, horizon=2)
    n = 6
    action = torch.zeros(n, 1)
    action[0] = float("nan")
    buf.add(
        TensorDict(
            {
                OBS: torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8),
                ACTION: action,
                REWARD: torch.zeros(n),
                TERMINATED: torch.zeros(n, dtype=torch.bool),
                EPISODE: torch.zeros(n, dtype=torch.int64),
            },
            batch_size=[n],
        )
    )
    batch = buf.sample()
    assert batch[OBS].dtype == torch.uint8
    assert batch[OBS].shape == (3, 8, 3, 4, 4)


def test_episodes_iterator_round_trip():
    buf = make_buffer(capacity=100)
    lengths = [4, 1, 9]
    fill(buf, lengths)
    eps = list(buf.episodes())
    assert [e.batch_size[0] for e in eps] == lengths
    for i, e in enumerate(eps):
        ref = make_episode(i, lengths[i])
        assert same(e, ref)


@pytest.mark.parametrize("num_rows", [1_000, 100_000])
def test_sample_cost_independent_of_size(num_rows):
    """Structural check: the number of candidate draws depends only on B and the
    acceptance rate, never on how many rows or episodes are stored."""
    buf = EpisodeSliceBuffer(SPEC, capacity=num_rows, batch_size=256, horizon=3, seed=0)
    fill(buf, [100] * (num_rows // 100))
    assert len(buf) == num_rows and buf.num_episodes == num_rows // 100
    for _ in range(5):
        check_slices(buf.sample(), 3)
        assert buf._last_num_rounds <= 2
        # accept rate 0.97: about 1.25 * 256 / 0.97 + 16 candidates per round
        assert buf._last_num_candidates <= 2 * 400


def test_low_acceptance_still_terminates():
    buf = make_buffer(capacity=5000, batch_size=256, horizon=3)
    fill(buf, [2] * 2000 + [4])  # a single valid start among 4004 rows
    batch = buf.sample()
    check_slices(batch, 3)
    assert (batch[EPISODE] == 2000).all()
    assert buf._last_num_rounds <= 10
