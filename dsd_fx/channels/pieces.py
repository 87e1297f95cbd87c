"""Channel spaces cut into pieces where parts of them are tied (fused QKV: one layer's q, k and v ranges)."""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from dsd_fx.channels.layout import FlowState, Member, Segment

RangeTie = tuple[Segment, Segment, int]  # (a's range, b's range, n): part j of n of a's range is part j of b's


def _cuts(state: FlowState) -> tuple[dict[int, set[int]], set[int]]:
    """Per atom, the positions where it must be cut so that every range tie joins whole pieces;
    and the atoms where a cut would fall between two channels (those are blocked)."""
    spans = [(Segment(a, 0, state.sizes[a]), Segment(b, 0, state.sizes[b])) for a, b, _ in state.ties]
    spans += [(sa, sb) for sa, sb, _ in state.range_ties]
    cuts = {a: {0, size} for a, size in enumerate(state.sizes)}
    for sa, sb, _ in state.range_ties:
        cuts[sa.atom] |= {sa.start, sa.start + sa.length}
        cuts[sb.atom] |= {sb.start, sb.start + sb.length}
    bad: set[int] = set()
    changed = True
    while changed:  # carry every cut across every tie, both ways, until nothing moves
        changed = False
        for x, y in spans + [(y, x) for x, y in spans]:
            for p in list(cuts[x.atom]):
                if x.start < p < x.start + x.length:
                    q = y.start + Fraction(p - x.start) * y.length / x.length
                    if q.denominator != 1:
                        bad.add(y.atom)
                    elif int(q) not in cuts[y.atom]:
                        cuts[y.atom].add(int(q))
                        changed = True
    return cuts, bad


def _pieces_of(seg: Segment, pieces: dict[int, list[tuple[int, int, int]]]) -> list[tuple[int, int, int]]:
    """(piece atom, start in the piece, length) of the pieces `seg` covers, in order."""
    out = []
    for new, lo, hi in pieces[seg.atom]:
        a, b = max(lo, seg.start), min(hi, seg.start + seg.length)
        if a < b:
            out.append((new, a - lo, b - a))
    return out


def refine(state: FlowState) -> FlowState:
    """The same channel analysis with every atom cut into the pieces its range ties need: members
    split at the cuts (offsets kept), ties between whole pieces. Identity when there are no range ties."""
    if not state.range_ties:
        return state
    cuts, bad = _cuts(state)
    out = FlowState()
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for a, size in enumerate(state.sizes):
        points = sorted(cuts[a])
        pieces[a] = []
        for lo, hi in zip(points, points[1:]):
            new = out.atom(hi - lo, state.producers[a])
            pieces[a].append((new, lo, hi))
            out.blocked[new] = list(state.blocked.get(a, []))
            if a in bad:
                out.blocked[new].append("a tie between parts of this layer's channels cuts between two channels")
    for a, m in state.members:
        for new, start, length in _pieces_of(Segment(a, m.start, m.length), pieces):
            lo = next(lo for n, lo, _ in pieces[a] if n == new)
            out.members.append((new, replace(m, start=start, length=length, offset=m.offset + lo + start - m.start)))
    whole = [(Segment(a, 0, state.sizes[a]), Segment(b, 0, state.sizes[b]), n) for a, b, n in state.ties]
    for sa, sb, n in whole + list(state.range_ties):
        left, right = _pieces_of(sa, pieces), _pieces_of(sb, pieces)
        if len(left) != len(right):
            out.blocked.setdefault(left[0][0], []).append("tied ranges cut into different pieces")
            continue
        for (pa, _, la), (pb, _, lb) in zip(left, right):
            parts = Fraction(n * la, sa.length)
            out.ties.append((pa, pb, int(parts) if parts.denominator == 1 and parts >= 1 else 1))
    return out
