"""Training windows over a long stream, drawn as views: the stream is never copied per window."""

from collections.abc import Iterator

import numpy as np
import torch


class WindowSampler:
    """Windows of `window` steps from `values[start:stop]` of a `(L, C)` stream.

    Window starts are multiples of `align` (the patch length, so that patches line up with the
    stream's own patch grid). `sample` draws a random batch; `sequential` walks the span in order.
    With `per_channel`, every channel is a series of its own and a window is one channel of the span,
    `(window, 1)`: the windows of a univariate model trained on every column of a stream (C times
    as many windows, drawn uniformly over (start, channel) pairs).
    """

    def __init__(self, values: np.ndarray | torch.Tensor, window: int, *, start: int = 0, stop: int | None = None, align: int = 1,
                 per_channel: bool = False):
        data = torch.as_tensor(values)
        if data.dim() != 2:
            raise ValueError(f"expected a (length, channels) stream, got shape {tuple(data.shape)}")
        stop = data.shape[0] if stop is None else stop
        if not 0 <= start < stop <= data.shape[0]:
            raise ValueError(f"need 0 <= start < stop <= {data.shape[0]}, got start={start}, stop={stop}")
        if window < 1 or align < 1:
            raise ValueError(f"window and align must be >= 1, got window={window}, align={align}")
        first = -(-start // align) * align
        if first + window > stop:
            raise ValueError(f"span [{start}, {stop}) is shorter than one window of {window} steps")
        self.data = data.float()
        self.window = window
        self.starts = torch.arange(first, stop - window + 1, align)
        self.channels = data.shape[1] if per_channel else 1  # series per start

    def __len__(self) -> int:
        return len(self.starts) * self.channels

    def windows_at(self, starts: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The windows `(len(starts), window, C)` that begin at the given steps; with `per_channel`, channel
        `channels[i]` of window i, `(len(starts), window, 1)` (default channel 0)."""
        if self.channels == 1:
            return torch.stack([self.data[s : s + self.window] for s in starts.tolist()])
        channels = torch.zeros(len(starts), dtype=torch.long) if channels is None else channels
        return torch.stack([self.data[s : s + self.window, c : c + 1] for s, c in zip(starts.tolist(), channels.tolist())])

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(starts, channels)` of a random batch of windows (drawn with replacement), for `windows_at`."""
        pick = torch.randint(len(self), (batch_size,), generator=generator)
        return self.starts[pick // self.channels], pick % self.channels

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random batch `(batch_size, window, C)` (windows drawn with replacement): `windows_at(*draw(...))`."""
        return self.windows_at(*self.draw(batch_size, generator))

    def sequential(self, batch_size: int, *, stride: int | None = None) -> Iterator[torch.Tensor]:
        """Batches of windows in stream order, `stride` steps apart (default: non-overlapping); with
        `per_channel`, each start's channels in turn (so the first batches cover every channel)."""
        stride = stride or self.window
        starts = self.starts[(self.starts - self.starts[0]) % stride == 0]
        starts_all = starts.repeat_interleave(self.channels)
        channels = torch.arange(self.channels).repeat(len(starts))
        for i in range(0, len(starts_all), batch_size):
            yield self.windows_at(starts_all[i : i + batch_size], channels[i : i + batch_size])
