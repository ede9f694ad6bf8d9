"""Continuous batching on a running decode state: samples join and leave between decode steps.

A generate.DecodeState keeps, per layer, seq-major K/V buffers [capacity, B, heads, dim], a
[B, capacity] mask of the slots that hold a token of each sample, the slots in use (the same for
every sample) and each sample's rotary position. Slot order does not matter to attention (keys
are stored rotated, positions travel in `positions`), only the mask does, so:
- join (concat_states): the samples of two states side by side along B; per layer the shorter
  side's rows get masked holes up to the longer side's length;
- leave (select_rows): keep some rows, then drop the slots no kept row uses (compact), so the
  cache of a long-running batch holds only what its current samples need;
- ensure_room: grow the capacity before a decode step, in chunks (amortized copies).
Each sample's attention sees exactly its own tokens whatever shares the batch, which is what
makes its tokens equal to its tokens alone.
"""
from __future__ import annotations

import dataclasses

import torch

from .generate import DecodeState

GROW = 32  # slots added at a time when a state runs out of room


def concat_states(a: DecodeState, b: DecodeState, room: int = 1) -> DecodeState:
    """a's samples then b's in one state, with room for at least `room` decode steps."""
    if len(a.keys) != len(b.keys):
        raise ValueError(f"states of different layer counts ({len(a.keys)} and {len(b.keys)})")
    keys, values, masks, lengths = [], [], [], []
    for layer in range(len(a.keys)):
        la, lb = a.lengths[layer], b.lengths[layer]
        length = max(la, lb)
        capacity = length + max(int(room), 1)
        parts_k, parts_v, parts_m = [], [], []
        for s, n in ((a, la), (b, lb)):
            k, v, m = s.keys[layer], s.values[layer], s.masks[layer]
            pad = capacity - n
            parts_k.append(torch.cat([k[:n], k.new_zeros(pad, *k.shape[1:])]))
            parts_v.append(torch.cat([v[:n], v.new_zeros(pad, *v.shape[1:])]))
            parts_m.append(torch.cat([m[:, :n], m.new_zeros(m.shape[0], pad)], dim=1))
        keys.append(torch.cat(parts_k, dim=1))
        values.append(torch.cat(parts_v, dim=1))
        masks.append(torch.cat(parts_m, dim=0))
        lengths.append(length)
    return dataclasses.replace(a, keys=keys, values=values, masks=masks, lengths=lengths,
                               positions=torch.cat([a.positions, b.positions]))


def select_rows(state: DecodeState, rows: list[int]) -> DecodeState | None:
    """The state of samples `rows` (in that order), compacted; None when no row is kept."""
    if not rows:
        return None
    index = torch.tensor(rows, dtype=torch.long, device=state.positions.device)
    keys, values, masks, lengths = [], [], [], []
    for k, v, m, n in zip(state.keys, state.values, state.masks, state.lengths):
        m = m[index, :n]
        used = m.any(dim=0).nonzero()[:, 0]  # slots some kept sample still needs
        length = int(used.shape[0])
        capacity = max(k.shape[0] - n, 1) + length
        kk = k.new_zeros(capacity, len(rows), *k.shape[2:])
        vv = v.new_zeros(capacity, len(rows), *v.shape[2:])
        mm = m.new_zeros(len(rows), capacity)
        kk[:length] = k[:n].index_select(1, index)[used]
        vv[:length] = v[:n].index_select(1, index)[used]
        mm[:, :length] = m[:, used]
        keys.append(kk)
        values.append(vv)
        masks.append(mm)
        lengths.append(length)
    return dataclasses.replace(state, keys=keys, values=values, masks=masks, lengths=lengths,
                               positions=state.positions[index].clone())


def ensure_room(state: DecodeState, steps: int = 1) -> DecodeState:
    """`state` itself when it has room for `steps` more decode steps, else a copy with GROW more."""
    if state.steps_left() >= steps:
        return state
    grow = max(int(steps), GROW)
    keys, values, masks = [], [], []
    for k, v, m in zip(state.keys, state.values, state.masks):
        keys.append(torch.cat([k, k.new_zeros(grow, *k.shape[1:])]))
        values.append(torch.cat([v, v.new_zeros(grow, *v.shape[1:])]))
        masks.append(torch.cat([m, m.new_zeros(m.shape[0], grow)], dim=1))
    return dataclasses.replace(state, keys=keys, values=values, masks=masks, lengths=list(state.lengths))
