"""strip_taps: the inverse of insert_taps; removes every tap node and the recorder."""
from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.tags import persist, tagged
from dsd_fx.passes.insert_taps import PASS as INSERT_TAPS
from dsd_fx.taps import RECORDER, RECORDER_ROLE, TAP_ROLE, recorder_of

PASS = "strip_taps"


def strip_taps(gm: fx.GraphModule) -> PassResult:
    """Remove every node insert_taps made and the `_dsd_fx_taps` recorder; touch nothing else.

    Before::

        _dsd_fx_taps = self._dsd_fx_taps
        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1);  fc1 = None
        relu_tap = dsd_fx_taps_tap(_dsd_fx_taps, relu, 'relu');  _dsd_fx_taps = relu = None
        fc2 = self.fc2(relu_tap);  relu_tap = None
        return fc2

    After::

        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1);  fc1 = None
        fc2 = self.fc2(relu);  relu = None
        return fc2

    Each tap's users read the tapped value again; the other nodes keep their names and order, so
    the generated code (after `gm.recompile()`, which the pipeline runs) equals the untapped graph's.
    """
    g = gm.graph
    taps = list(tagged(g, INSERT_TAPS, TAP_ROLE))
    readers = list(tagged(g, INSERT_TAPS, RECORDER_ROLE))
    if not taps and not readers and recorder_of(gm) is None:
        return PassResult(gm, modified=False)
    known = set(taps)
    strays = [u.name for r in readers for u in r.users if u not in known]
    if strays:  # checked before any change
        raise ValueError(
            f"strip_taps: the tap recorder is read by untagged node(s) {', '.join(strays)}: a pass copied a tap "
            "without its tag. Strip taps before passes that rebuild the graph (strip_masks)"
        )
    for node in taps:
        node.replace_all_uses_with(node.args[1])
        g.erase_node(node)
    for node in readers:
        g.erase_node(node)
    if recorder_of(gm) is not None:
        delattr(gm, RECORDER)
    persist(gm)  # keep the records' copy of the tags in step (see dsd_fx.tags.persist)
    return PassResult(gm, modified=True)
