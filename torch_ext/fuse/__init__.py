"""``fuse``/``unfuse``: find each ``nn.Linear`` whose output only feeds an activation, by reading
the model's forward code as a graph (``torch.fx`` symbolic tracing), and swap in the fused layer.

How it reads a model. Every module that has children and its own ``forward`` is traced on its
own, its children standing as opaque calls (fx "leaf" modules), so each graph is the code of one
``forward``: ``self.fc1(x)`` is a ``call_module`` node, ``F.gelu(h)`` a ``call_function`` node,
``h.relu()`` a ``call_method`` node. A pair ``Linear -> activation`` is fused where the Linear's
output has that one use (an ``nn.Dropout`` or ``nn.Identity`` between them may pass it on, where
moving it after the activation keeps values), and where every call of that Linear, in every
graph that calls it, is such a pair with the same activation. A module whose forward cannot be
traced (data-dependent control flow, ...) and PyTorch's own modules with children
(``nn.TransformerEncoderLayer``, ...) are opaque: the Linear layers they call directly are left
alone, their children are read in their own graphs. Each module is traced in train and in eval
mode; a forward that reads ``self.training`` gets one graph per mode. A forward is not read as a
graph (the report says why) where tracing it sets attributes on modules (``self.n += 1``,
``self.last = h``; put back as they were), draws random numbers (``random``, ``torch.rand``:
stochastic depth; the generators' states are put back), or gives another graph when traced again.

Which calls are activations: torch's functions, methods and activation modules by the registry
(:mod:`fusedlinear.backend.activations`), any other parameter-free module by what it computes
(:mod:`.recognise`: values and gradients checked in float64 against the table's entry, refused
with the reason otherwise). A Linear called from a forward fx cannot trace is read with
TorchDynamo from ``example_inputs`` when given (:mod:`.capture`), where its activation is a module,
both modes show the pair and the caller's bytecode shows one straight call site.

The phases, one file each: :mod:`.trace` (fx graphs), :mod:`.capture` (TorchDynamo),
:mod:`.patterns` (pairs and which Linear layers may change), :mod:`.recognise`, :mod:`.plan`
(choosing, building), :mod:`.rewrite` (forwards without the activation calls), :mod:`.report`,
:mod:`.unfuse`.

How it changes a model, keeping the module tree and every ``state_dict`` key:

* the ``nn.Linear`` becomes the fused layer, at the same name, sharing its parameters;
* an activation *module* whose every call was fused becomes a :class:`FusedActivation` (an
  ``nn.Identity`` that remembers the original) where nothing else can call it: in a plain
  ``nn.Sequential``, or where :mod:`.capture` checked the caller's code. In a module of the user's
  class (another method may call it) it stays, and that forward is rewritten as below;
* a *functional* or *method* activation (``F.relu(self.fc(x))``) can only go by changing the
  code that calls it: that module's class becomes a subclass of its own class (same name, same
  attributes and methods, ``isinstance`` unchanged) whose ``forward`` is the traced graph less the
  fused activation calls. Such a forward holds for tensor arguments (any other argument raises a
  clear error) and is specialised to the Python values it read at ``fuse`` time, as any fx graph;
  only forwards whose arguments are all required are rewritten;
* a plain ``nn.Sequential`` that now holds fused layers becomes a :class:`FusedSequential`.

Everything is planned (traced, checked, built) before anything in the model changes, so a
refusal leaves the model as it was. :func:`unfuse` undoes each of these.
"""

from .plan import fuse
from .report import FusedPair, FuseReport
from .rewrite import _rebuild  # noqa: F401  (modules pickled by an earlier fuse name it here)
from .unfuse import unfuse

__all__ = ["FusedPair", "FuseReport", "fuse", "unfuse"]
