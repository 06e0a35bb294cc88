"""One device-to-host copy per traced batch, started without waiting for it.

A trace on a GPU ends with a few small tensors per MoE layer (logits, selected experts,
their weights). Copying each to the host separately costs a synchronisation per tensor;
here they are packed into one byte buffer on the device and copied once, into pinned host
memory and asynchronously where the device allows, so the next batch's forward can be
queued while the copy runs. ``PendingCopy.wait()`` hands back the host tensors.
On the CPU there is nothing to copy and the tensors come back as they are.
"""

from __future__ import annotations

import torch

__all__ = ["PendingCopy", "pack", "start_host_copy", "unpack"]

_ALIGN = 8  # every segment starts on an 8-byte boundary so any dtype can be viewed back


class PendingCopy:
    """Host tensors of one batch, ready after ``wait()`` (immediately on the CPU)."""

    def __init__(self, buffer: torch.Tensor | None, layout: "Layout",
                 event: object | None, tensors: list[torch.Tensor] | None = None) -> None:
        self._buffer, self._layout, self._event, self._tensors = buffer, layout, event, tensors

    def wait(self) -> list[torch.Tensor]:
        if self._tensors is not None:
            return self._tensors
        if self._event is not None:
            self._event.synchronize()
        out = unpack(self._buffer, self._layout)
        self._tensors = out
        return out


Layout = list[tuple[int, torch.dtype, torch.Size]]


def pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """All ``tensors`` as one uint8 buffer on their device, and where each one lies in it."""
    parts, layout, offset = [], [], 0
    for t in tensors:
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        layout.append((offset, t.dtype, t.shape))
        parts.append(raw)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=t.device))
        offset += raw.numel() + pad
    return torch.cat(parts), layout


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors ``pack`` put in ``buffer``, as views of it."""
    return [buffer[o: o + shape.numel() * dtype.itemsize].view(dtype).view(shape) for o, dtype, shape in layout]


def start_host_copy(tensors: list[torch.Tensor]) -> PendingCopy:
    """Start copying ``tensors`` (all on one device) to the host in a single transfer."""
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return PendingCopy(None, [], None, [t.detach() for t in tensors])
    packed, layout = pack(tensors)
    if packed.device.type == "cuda":
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(packed.device))
        return PendingCopy(host, layout, event)
    return PendingCopy(packed.cpu(), layout, None)
