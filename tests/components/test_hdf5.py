"""HDF5 episode datasets: round trip, streaming loads, atomic writes, one clear error each."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from components.replay.episodic import EpisodeSliceBuffer
from components.replay.hdf5 import (FORMAT, FORMAT_VERSION, REQUIRED_DATASETS, DatasetError,
                                    HDF5EpisodeDataset, export_replay, load_into,
                                    write_episodes)
from rlcore.types import ACTION, EPISODE, OBS, REWARD, TERMINATED, EnvSpec

SPEC = EnvSpec(obs_shape=(3,), action_dim=2, episode_length=20, action_repeat=2,
               task="toy-task")
LENGTHS = [5, 8, 1, 12, 6, 9, 7, 3, 11, 4]  # rows per episode (transitions + 1)


def make_episode(ep_id: int, num_rows: int, spec: EnvSpec = SPEC, *,
                 terminated: bool = False) -> TensorDict:
    """Rows encode (episode, t); row 0 has NaN action and reward (arrival convention)."""
    g = torch.Generator().manual_seed(ep_id)
    if spec.obs_type == "pixels":
        obs = torch.randint(0, 256, (num_rows, *spec.obs_shape), generator=g,
                            dtype=torch.uint8)  # [n+1, C, H, W]
    else:
        obs = torch.randn(num_rows, *spec.obs_shape, generator=g)  # [n+1, D]
    action = torch.rand(num_rows, spec.action_dim, generator=g) * 2 - 1  # [n+1, A]
    reward = torch.randn(num_rows, generator=g)  # [n+1]
    action[0] = float("nan")
    reward[0] = float("nan")
    term = torch.zeros(num_rows, dtype=torch.bool)
    term[-1] = terminated
    return TensorDict({OBS: obs, ACTION: action, REWARD: reward, TERMINATED: term,
                       EPISODE: torch.full((num_rows,), ep_id, dtype=torch.int64)},
                      batch_size=[num_rows])


def episodes(lengths=LENGTHS, spec=SPEC):
    return [make_episode(100 + i, n, spec, terminated=i % 3 == 0) for i, n in enumerate(lengths)]


def same(a: TensorDict, b: TensorDict) -> bool:
    """Exact equality, NaN equal to NaN."""
    if a.batch_size != b.batch_size or set(a.keys()) != set(b.keys()):
        return False
    return all(torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0))
               if a[k].is_floating_point() else torch.equal(a[k], b[k]) for k in a.keys())


@pytest.fixture
def dataset_file(tmp_path):
    path = tmp_path / "data.h5"
    write_episodes(path, episodes(), SPEC, meta={"source": "test"})
    return path


# ---------------------------------------------------------------------------------------
# Round trip and format.
# ---------------------------------------------------------------------------------------
def test_round_trip_is_exact_with_nan_first_rows_and_boundaries(dataset_file):
    eps = episodes()
    data = HDF5EpisodeDataset(dataset_file)
    back = list(data.iter_episodes(chunk_episodes=4))
    assert len(back) == len(eps) == data.num_episodes
    for a, b in zip(eps, back, strict=True):
        assert same(a, b)
        assert b[ACTION][0].isnan().all() and b[REWARD][0].isnan()  # kept, not filled
        assert not b[ACTION][1:].isnan().any()
    assert data.episode_lengths.tolist() == LENGTHS
    assert data.episode_starts.tolist() == np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]).tolist()
    assert data.num_rows == sum(LENGTHS)
    assert data.num_transitions == sum(LENGTHS) - len(LENGTHS)


def test_attributes_document_the_data(dataset_file):
    info = HDF5EpisodeDataset(dataset_file).info
    assert info.format_version == FORMAT_VERSION
    assert info.task == "toy-task" and info.obs_shape == (3,) and info.action_dim == 2
    assert info.action_repeat == 2 and info.episode_length == 20 and not info.episodic
    assert info.env_steps == (sum(LENGTHS) - len(LENGTHS)) * 2
    assert info.framework_version and info.created_at.endswith("+00:00")
    assert info.meta == {"source": "test"}
    assert HDF5EpisodeDataset(dataset_file).spec == SPEC
    with h5py.File(dataset_file, "r") as f:  # plain h5py sees the documented layout
        assert f.attrs["format"] == FORMAT
        assert set(REQUIRED_DATASETS) <= set(f.keys())
        assert f[OBS].dtype == np.float32 and f[ACTION].shape == (sum(LENGTHS), 2)
        assert f[TERMINATED].dtype == bool and f[EPISODE].dtype == np.int64
        assert np.isnan(f[REWARD][0]) and json.loads(f.attrs["meta"]) == {"source": "test"}


def test_pixels_round_trip_as_uint8(tmp_path):
    spec = EnvSpec(obs_shape=(3, 8, 8), action_dim=1, episode_length=10, obs_type="pixels")
    eps = episodes([4, 6, 3], spec)
    write_episodes(tmp_path / "pix.h5", eps, spec, compression="gzip")
    data = HDF5EpisodeDataset(tmp_path / "pix.h5")
    assert data.info.obs_dtype == "uint8" and data.spec.obs_type == "pixels"
    back = list(data.iter_episodes())
    assert all(same(a, b) for a, b in zip(eps, back, strict=True))
    assert back[0][OBS].dtype == torch.uint8


def test_export_replay_writes_the_buffer_episodes(tmp_path):
    buf = EpisodeSliceBuffer(SPEC, capacity=40, horizon=2)
    for ep in episodes():  # 66 rows into 40: the oldest episodes are dropped whole
        buf.add(ep)
    info = export_replay(buf, SPEC, tmp_path / "replay.h5", source="unit-test")
    kept = list(buf.episodes())
    assert info.num_episodes == len(kept) < len(LENGTHS)
    assert info.meta == {"source": "unit-test"}
    back = list(HDF5EpisodeDataset(tmp_path / "replay.h5").iter_episodes())
    assert all(same(a, b) for a, b in zip(kept, back, strict=True))


# ---------------------------------------------------------------------------------------
# Streaming loads.
# ---------------------------------------------------------------------------------------
def test_load_into_streams_in_blocks(dataset_file):
    data = HDF5EpisodeDataset(dataset_file)
    buf = EpisodeSliceBuffer(SPEC, capacity=1000, horizon=2)
    assert load_into(buf, [data], chunk_episodes=3) == len(LENGTHS)
    # Never more than 3 consecutive episodes in memory at once: 4 reads of <= 3 episodes.
    assert data.num_reads == 4
    assert data.max_rows_read == max(sum(LENGTHS[i:i + 3]) for i in range(0, 10, 3))
    assert data.max_rows_read < data.num_rows
    assert all(same(a, b) for a, b in zip(episodes(), buf.episodes(), strict=True))
    assert len(buf) == data.num_rows and buf.num_transitions == data.num_transitions


def test_load_subset_reads_only_nearby_rows(dataset_file):
    data = HDF5EpisodeDataset(dataset_file)
    buf = EpisodeSliceBuffer(SPEC, capacity=1000, horizon=0)
    load_into(buf, [data], chunk_episodes=2, indices=[[9, 1, 4]])
    eps = episodes()
    assert [int(e[EPISODE][0]) for e in buf.episodes()] == [101, 104, 109]
    assert all(same(eps[i], b) for i, b in zip([1, 4, 9], buf.episodes(), strict=True))
    assert data.max_rows_read <= max(LENGTHS[i] + LENGTHS[i + 1] for i in range(9))


def test_load_several_files_in_order(tmp_path):
    write_episodes(tmp_path / "a.h5", episodes()[:4], SPEC)
    write_episodes(tmp_path / "b.h5", episodes()[4:], SPEC)
    buf = EpisodeSliceBuffer(SPEC, capacity=1000)
    assert load_into(buf, [tmp_path / "a.h5", str(tmp_path / "b.h5")]) == len(LENGTHS)
    assert all(same(a, b) for a, b in zip(episodes(), buf.episodes(), strict=True))
    batch = buf.sample(8)  # the loaded buffer samples slices as usual
    assert batch.batch_size == torch.Size([buf.horizon + 1, 8])


# ---------------------------------------------------------------------------------------
# Atomic writes: never replace, never leave partial files.
# ---------------------------------------------------------------------------------------
def test_existing_file_is_not_overwritten(dataset_file):
    before = dataset_file.read_bytes()
    with pytest.raises(DatasetError, match="already exists"):
        write_episodes(dataset_file, episodes()[:2], SPEC)
    assert dataset_file.read_bytes() == before
    info = write_episodes(dataset_file, episodes()[:2], SPEC, overwrite=True)
    assert info.num_episodes == 2 and HDF5EpisodeDataset(dataset_file).num_episodes == 2
    assert os.listdir(dataset_file.parent) == [dataset_file.name]  # no temporary files left


def test_failed_write_leaves_nothing(tmp_path):
    bad = episodes()[:3] + [make_episode(7, 4, EnvSpec(obs_shape=(4,), action_dim=2,
                                                       episode_length=20))]
    with pytest.raises(DatasetError, match=r"episode 3: 'obs' has shape \(4, 4\)"):
        write_episodes(tmp_path / "x.h5", iter(bad), SPEC)
    with pytest.raises(DatasetError, match="no episodes"):
        write_episodes(tmp_path / "x.h5", [], SPEC)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Bad files: one DatasetError each, naming the file and the fix.
# ---------------------------------------------------------------------------------------
def test_missing_dataset(dataset_file):
    with h5py.File(dataset_file, "a") as f:
        del f[REWARD]
        del f["episode_lengths"]
    with pytest.raises(DatasetError) as err:
        HDF5EpisodeDataset(dataset_file)
    msg = str(err.value)
    assert str(dataset_file) in msg and "reward" in msg and "episode_lengths" in msg
    assert "runners.export" in msg  # the fix


def test_truncated_file(dataset_file):
    data = dataset_file.read_bytes()
    dataset_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        HDF5EpisodeDataset(dataset_file)
    assert str(dataset_file) in str(err.value) and "truncated" in str(err.value)


def test_not_hdf5_and_missing_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n")
    with pytest.raises(DatasetError, match="cannot be opened as HDF5"):
        HDF5EpisodeDataset(text)
    with pytest.raises(DatasetError, match="does not exist"):
        HDF5EpisodeDataset(tmp_path / "missing.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["observations"] = np.zeros((4, 3))
    with pytest.raises(DatasetError, match="not a 'tdmpc2-gin/episodes' episode dataset"):
        HDF5EpisodeDataset(foreign)


def test_corrupt_chunk_is_detected_on_read(dataset_file):
    with h5py.File(dataset_file, "r") as f:
        chunk = f[OBS].id.get_chunk_info(0)
    with open(dataset_file, "r+b") as fh:  # flip bytes inside the first obs chunk
        fh.seek(chunk.byte_offset + 8)
        fh.write(b"\xff\x00\xff\x00")
    data = HDF5EpisodeDataset(dataset_file)  # the schema is intact
    with pytest.raises(DatasetError) as err:
        list(data.iter_episodes())
    assert str(dataset_file) in str(err.value) and "corrupt" in str(err.value)


def test_inconsistent_attributes_and_newer_format(dataset_file):
    with h5py.File(dataset_file, "a") as f:
        f.attrs["num_rows"] = 7
    with pytest.raises(DatasetError, match="inconsistent"):
        HDF5EpisodeDataset(dataset_file)
    with h5py.File(dataset_file, "a") as f:
        f.attrs["num_rows"] = sum(LENGTHS)
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(DatasetError, match="format_version"):
        HDF5EpisodeDataset(dataset_file)


@pytest.mark.parametrize("spec, expected", [
    (EnvSpec(obs_shape=(4,), action_dim=2, episode_length=20), r"observations of shape \(3,\)"),
    (EnvSpec(obs_shape=(3,), action_dim=5, episode_length=20), "2-dim actions"),
])
def test_shape_mismatch_with_the_buffer(dataset_file, spec, expected):
    buf = EpisodeSliceBuffer(spec, capacity=1000)
    with pytest.raises(DatasetError, match=expected) as err:
        load_into(buf, [dataset_file])
    assert str(dataset_file) in str(err.value) and "same task" in str(err.value)
    assert len(buf) == 0  # checked before anything is added
