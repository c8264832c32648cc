"""Video helpers: mp4 files (imageio + ffmpeg) and TensorBoard videos without moviepy.

Frames are uint8 RGB arrays [H, W, 3]; a clip is [T, H, W, 3]. mp4 files are written
under a temporary name in the target folder and renamed into place when complete, so a
crash never leaves a half-written video under the final name.

TensorBoard. `SummaryWriter.add_video` needs moviepy (not a dependency) and silently
writes nothing without it. `add_video` here writes the same record `add_video` would: an
animated GIF inside an image summary, which TensorBoard's Images tab plays. GIFs are large,
so the clip can be shrunk and strided before encoding.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["Mp4Writer", "add_video", "encode_gif", "read_mp4", "resize_frames", "write_mp4"]


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected a uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
    return frame


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize frames to size x size (Pillow's bilinear filter; nearest neighbour without it).

    Shapes: [..., H, W, 3] uint8 -> [..., size, size, 3] uint8.
    """
    frames = np.asarray(frames)
    if frames.shape[-3:-1] == (size, size):
        return frames
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:])  # [N, H, W, 3]
    try:
        from PIL import Image
    except ImportError:  # nearest neighbour in numpy
        rows = (np.arange(size) * flat.shape[1] // size).clip(0, flat.shape[1] - 1)
        cols = (np.arange(size) * flat.shape[2] // size).clip(0, flat.shape[2] - 1)
        out = flat[:, rows][:, :, cols]
    else:
        out = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
                        for f in flat])
    return out.reshape(*lead, size, size, 3)


class Mp4Writer:
    """Stream frames into an mp4 file (H.264, yuv420p) that appears only when complete.

    Frame sides must be even (yuv420p). Use as a context manager: leaving the block by an
    exception removes the temporary file and leaves any existing file at `path` alone.
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: float = 30.0, quality: int = 7):
        import imageio.v2 as iio

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # ffmpeg picks the container from the suffix, so the temporary name keeps `.mp4`.
        self._tmp = self.path.with_name(f".tmp_{os.getpid()}_{self.path.name}")
        self._writer = iio.get_writer(self._tmp, format="FFMPEG", mode="I", fps=fps,
                                      codec="libx264", quality=quality, macro_block_size=1,
                                      pixelformat="yuv420p")
        self.frames = 0
        self.shape: tuple[int, int] | None = None

    def append(self, frame: np.ndarray) -> None:
        frame = _check_frame(frame)
        if self.shape is None:
            if frame.shape[0] % 2 or frame.shape[1] % 2:
                raise ValueError(f"mp4 frames need even sides, got {frame.shape[:2]}")
            self.shape = frame.shape[:2]
        elif frame.shape[:2] != self.shape:
            raise ValueError(f"frame {frame.shape[:2]} differs from the first one {self.shape}")
        self._writer.append_data(frame)
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns the final path."""
        self._writer.close()
        if self.frames == 0:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"no frames were written to {self.path}")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike[str], *,
              fps: float = 30.0) -> int:
    """Write uint8 frames [T, H, W, 3] to an mp4 file atomically; returns T."""
    with Mp4Writer(path, fps=fps) as writer:
        for frame in frames:
            writer.append(frame)
    return writer.frames


def read_mp4(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an mp4 file into uint8 frames [T, H, W, 3] (for tests and inspection)."""
    import imageio.v2 as iio

    with iio.get_reader(Path(path), format="FFMPEG") as reader:
        frames = [np.asarray(f)[..., :3] for f in reader]
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(frames)


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """An animated, looping GIF of uint8 frames [T, H, W, 3] (Pillow)."""
    from PIL import Image

    images = [Image.fromarray(_check_frame(f)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return buf.getvalue()


def add_video(writer: Any, tag: str, frames: np.ndarray, step: int, *, fps: float = 30.0,
              size: int | None = 128, stride: int = 1) -> None:
    """Log a clip to TensorBoard as an animated GIF image summary (what `add_video` writes).

    Args:
        writer: a `torch.utils.tensorboard.SummaryWriter`.
        frames: uint8 [T, H, W, 3].
        size: shrink frames to size x size first (None keeps them); GIFs are big.
        stride: keep every `stride`-th frame (the frame rate drops with it, so the clip
            keeps its real-time speed).
    """
    from torch.utils.tensorboard.summary import Summary

    frames = np.asarray(frames)[::stride]  # [T', H, W, 3]
    if size is not None:
        frames = resize_frames(frames, size)
    image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                          encoded_image_string=encode_gif(frames, fps / stride))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                          step)
