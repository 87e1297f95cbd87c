"""The records of channel analysis: members, segments, layouts and what propagation found."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Member:
    """One tensor slice that follows a group's channels.

    Group channel c in [start, start + length) is the block of indices
    [(offset + c - start) * repeat, (offset + c - start + 1) * repeat) of dim `dim` of
    `layer.tensor` (tensor "" for a norm layer with no per-channel tensor: only its count).
    role: "out" (a producer's output), "in" (a consumer's input), "norm" (affine or running stats),
    "size" (a literal size in a node's arguments: `layer` is the node's name, `tensor` "#" and the
    path of the argument, like "#1" or "#1.2"; the prune pass rewrites it).
    unit: while propagation runs, how many channels one block of `repeat` indices holds (a
    tensor split into attention heads: one index a head of `unit` channels); channels.groups_of
    turns every member into group units, where unit is 1 again.
    """

    layer: str
    tensor: str
    dim: int
    role: str
    offset: int = 0
    start: int = 0
    length: int = 0
    repeat: int = 1
    unit: int = 1

    @property
    def path(self) -> str:
        """`layer.tensor` (a parameter of the root: its name)."""
        name = self.tensor or "<count>"
        return f"{self.layer}.{name}" if self.layer else name

    def positions(self, channels) -> list[int]:
        """Indices of dim `dim` that the group channels `channels` own here."""
        if self.unit != 1:
            raise ValueError(f"member {self.path} counts blocks of {self.unit} channels: take it from a ChannelGroup")
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
    """Where channels sit in one tensor: dim `dim` is the concatenation of `segments`, read in
    blocks of `unit` channels (1, or the channels of one attention head after a view splits the
    width into (heads, head_dim)), each block spread over `repeat` indices (after a flatten, or
    a KV head repeated for the query heads that read it). Index i holds block i // repeat, that
    is channels [(i // repeat) * unit, (i // repeat + 1) * unit) of the concatenation."""

    dim: int
    segments: tuple[Segment, ...]
    repeat: int = 1
    unit: int = 1

    @property
    def size(self) -> int:
        return sum(s.length for s in self.segments)


@dataclass
class FlowState:
    """What propagation found: atom sizes and producers, members per atom, ties, blocks.

    A tie (a, b, n) says: cut into n equal parts in order, part j of atom a's channels lives or
    dies with part j of b's (n = the size of both for a one-to-one tie; the number of KV heads
    for query channels tied to the KV heads they read)."""

    sizes: list[int] = field(default_factory=list)
    producers: dict[int, str] = field(default_factory=dict)
    members: list[tuple[int, Member]] = field(default_factory=list)
    ties: list[tuple[int, int, int]] = field(default_factory=list)  # (a, b, n): a's n equal parts are b's, in order
    range_ties: list = field(default_factory=list)  # (Segment, Segment, n): the same between parts of atoms (fused QKV)
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
            self.members.append((s.atom, Member(layer, tensor, dim, role, pos, s.start, s.length, lay.repeat, lay.unit)))
            pos += s.length
