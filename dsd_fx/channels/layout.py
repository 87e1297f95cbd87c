"""The records of channel analysis: members, segments, layouts and what propagation found."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Member:
    """One tensor slice that follows a group's channels.

    Group channel c in [start, start + length) is the block of indices
    [(offset + c - start) * repeat, (offset + c - start + 1) * repeat) of dim `dim` of
    `layer.tensor` (tensor "" for a norm layer with no per-channel tensor: only its count).
    role: "out" (a producer's output), "in" (a consumer's input), "norm" (affine or running stats).
    """

    layer: str
    tensor: str
    dim: int
    role: str
    offset: int = 0
    start: int = 0
    length: int = 0
    repeat: int = 1

    @property
    def path(self) -> str:
        """`layer.tensor` (a parameter of the root: its name)."""
        name = self.tensor or "<count>"
        return f"{self.layer}.{name}" if self.layer else name

    def positions(self, channels) -> list[int]:
        """Indices of dim `dim` that the group channels `channels` own here."""
        out = []
        for c in channels:
            if self.start <= c < self.start + self.length:
                base = (self.offset + c - self.start) * self.repeat
                out.extend(range(base, base + self.repeat))
        return out


@dataclass(frozen=True)
class Segment:
    """Channels [start, start + length) of channel space `atom` (one producer's outputs)."""

    atom: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """Where channels sit in one tensor: dim `dim` is the concatenation of `segments`, each
    channel a block of `repeat` indices (after a flatten)."""

    dim: int
    segments: tuple[Segment, ...]
    repeat: int = 1

    @property
    def size(self) -> int:
        return sum(s.length for s in self.segments)


@dataclass
class FlowState:
    """What propagation found: atom sizes and producers, members per atom, ties, blocks."""

    sizes: list[int] = field(default_factory=list)
    producers: dict[int, str] = field(default_factory=dict)
    members: list[tuple[int, Member]] = field(default_factory=list)
    ties: list[tuple[int, int]] = field(default_factory=list)
    blocked: dict[int, list[str]] = field(default_factory=dict)

    def atom(self, size: int, producer: str) -> int:
        self.sizes.append(size)
        self.producers[len(self.sizes) - 1] = producer
        return len(self.sizes) - 1

    def block(self, layouts, reason: str) -> None:
        for lay in layouts:
            if isinstance(lay, tuple):
                self.block(lay, reason)
            elif isinstance(lay, Layout):
                for s in lay.segments:
                    self.blocked.setdefault(s.atom, []).append(reason)

    def attach(self, lay: Layout, layer: str, tensor: str, dim: int, role: str) -> None:
        pos = 0
        for s in lay.segments:
            self.members.append((s.atom, Member(layer, tensor, dim, role, pos, s.start, s.length, lay.repeat)))
            pos += s.length
