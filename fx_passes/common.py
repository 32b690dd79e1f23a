"""What every panther pass needs from a Dynamo FX graph: real weights, layer names, shapes, new constants,
a networkx view of the dataflow, and the factor cache.

Facts this relies on (torch 2.6-2.13, see docs/compile.md): Dynamo hands the backend a GraphModule whose
parameters are *placeholders* (no ``call_module``/``get_attr``); ``example_inputs[i]`` is the real
``nn.Parameter`` of the i-th placeholder and ``placeholder.meta["grapharg"].source.name`` its access path
(``L['self']._modules['fc1']._parameters['weight']``); every other node carries a FakeTensor in
``meta["example_value"]``. New tensors go on the gm as buffers plus a ``ConstantSource`` entry in
``gm._param_name_to_source`` (AOTAutograd asserts every gm buffer has a source); placeholders are never
touched because Dynamo reads their meta again after the backend returns.
"""
from __future__ import annotations

import contextlib
import operator
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import networkx as nx
import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

import panther
from panther.policy import LayerInfo, SketchSpec
from panther.report import ReportRow

__all__ = ["PassContext", "Candidate", "FactorCache", "factor_cache", "concrete", "shape_of"]

# ``._modules['x']``; ``.__dict__['_modules']['x']`` (modules whose class defines ``__getattr__``, as diffusers'
# do) and ``.__dict__['x']``; ``.x``; ``[0]`` and ``['x']`` (ModuleList / ModuleDict items)
_ACCESS = re.compile(r"""(?:\.__dict__\[['"])?\.?_(?:modules|parameters|buffers)(?:['"]\])?\[['"]([^'"]+)['"]\]"""
                     r"""|\.__dict__\[['"]([^'"]+)['"]\]|\.(\w+)|\[(\d+)\]|\[['"]([^'"]+)['"]\]""")
# a module passed through a wrapper's ``*args`` (Hugging Face's forward decorators) is ``L['args'][0]``
_ROOT = re.compile(r"""^(?:[LG]\[['"]args['"]\]\[\d+\]|[LG]\[['"][^'"]+['"]\]|[A-Za-z_]\w*)""")
_FRAME = re.compile(r'File "([^"]+)", line \d+')   # the files of a node's stack trace, outermost first
_PANTHER_NN = os.path.join(os.path.dirname(os.path.abspath(panther.__file__)), "nn") + os.sep   # the layers' code


def source_to_fqn(source_name: str) -> Optional[str]:
    """``L['self']._modules['blocks']._modules['0']._parameters['weight']`` -> ``blocks.0.weight``.

    The root local (``L['self']``, ``L['fn']``, ``G['model']``, ``L['args'][0]``...) is dropped; attribute and index
    spellings (``L['self'].blocks[0].weight``) are understood too. ``None`` if nothing is left.
    """
    m = _ROOT.match(source_name)
    rest = source_name[m.end():] if m else source_name
    parts = []
    for mm in _ACCESS.finditer(rest):
        parts.append(next(g for g in mm.groups() if g is not None))
    return ".".join(parts) or None


def compiled_root() -> Optional[torch.nn.Module]:
    """The module ``torch.compile`` wrapped, found on the call stack while Dynamo compiles one of its frames
    (the nearest ``OptimizedModule``), unwrapped from ``DistributedDataParallel`` / ``DataParallel`` (whose
    ``module.`` prefix no policy names); None when a function was compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe()
    while frame is not None:
        this = frame.f_locals.get("self")
        if isinstance(this, OptimizedModule):
            root = this._orig_mod
            while isinstance(root, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
                root = root.module
            return root
        frame = frame.f_back
    return None


def concrete(d) -> int:
    """An int for a possibly symbolic size (its hint: FLOPs are estimates at the traced shapes)."""
    if isinstance(d, int):
        return d
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(d, fallback=1))
    except Exception:  # noqa: BLE001 - older torch: fall back on the node's hint
        hint = getattr(getattr(d, "node", None), "hint", None)
        return int(hint) if hint is not None else 1


def same_sizes(a, b) -> bool:
    """Whether two shapes, possibly symbolic, are known equal (without guarding on symbols)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def shape_of(value) -> Optional[Tuple[int, ...]]:
    if isinstance(value, torch.Tensor):
        return tuple(concrete(s) for s in value.shape)
    return None


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


# ------------------------------------------------------------------------------------------------------
# factor cache: a recompile (new batch size, dynamic shapes...) calls the backend again on a fresh graph;
# the expensive part (SVD, random draws) is reused as long as the weight is the same object, unmodified.


class FactorCache:
    """Values keyed by an *owner* tensor (weakly, by identity) and a hashable key.

    ``hits``/``misses`` count lookups (tests use them to check a recompile does not refactorise).
    Entries die with their owner; ``clear()`` drops everything.
    """

    def __init__(self):
        self._owned = WeakIdKeyDictionary()
        self._unowned: Dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        #: persist deterministic factors under Inductor's cache dir (``<cache>/panther_factors``)
        self.disk = True

    def get(self, owner: Optional[torch.Tensor], key: Hashable, compute: Callable[[], Any], *,
            persist: Optional[Tuple[torch.Tensor, Hashable]] = None):
        """The cached value for (owner, key), else ``compute()``.

        ``persist=(tensor, key)`` also keeps the value on disk under a hash of the tensor's bytes and that
        key, so another process compiling the same weights skips the computation. Pass it only for
        deterministic values (an SVD init, or a seeded draw): a replayed unseeded draw would change what
        the global RNG means.
        """
        with self._lock:
            table = self._unowned if owner is None else self._owned.setdefault(owner, {})
            if key in table:
                self.hits += 1
                return table[key]
        path = self._path(*persist) if (persist is not None and self.disk) else None
        value = _load(path, persist[0].device) if path is not None else None
        if value is not None:
            self.disk_hits += 1
        else:
            value = compute()
            if path is not None:
                _store(path, value)
            self.misses += 1
        with self._lock:
            table[key] = value
        return value

    def _path(self, tensor, key):
        import hashlib
        import os

        h = hashlib.sha256(repr((key, tuple(tensor.shape), str(tensor.dtype), torch.__version__, _code_hash())).encode())
        h.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return os.path.join(_disk_dir(), h.hexdigest() + ".pt")

    def clear(self):
        with self._lock:
            self._owned = WeakIdKeyDictionary()
            self._unowned.clear()
            self.hits = self.misses = self.disk_hits = 0


def _disk_dir():
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "panther_factors")


_CODE_HASH = None


def _code_hash():
    """Hash of the code that computes factors, so cached files die with a change to it."""
    global _CODE_HASH
    if _CODE_HASH is None:
        import hashlib
        import inspect

        from panther.sketch import factors

        from . import sketch_conv2d, sketch_linear, sketch_sdpa

        h = hashlib.sha256()
        for mod in (factors, sketch_linear, sketch_conv2d, sketch_sdpa):
            h.update(inspect.getsource(mod).encode())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def _load(path, device):
    import os

    if not os.path.exists(path):
        return None
    try:
        # The backend runs inside Dynamo's tracing context, whose fake mode would make torch.load
        # return data-less tensors: load outside it.
        with torch._guards.tracing(None):
            value = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign file is just a miss
        return None
    return _to_tuples(value)


def _to_tuples(v):
    return tuple(_to_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _store(path, value):
    import os
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(value, f)
        os.replace(tmp, path)  # atomic: concurrent compiles never read a half-written file
    except OSError:
        pass  # a read-only cache dir only costs the recomputation


factor_cache = FactorCache()


# ------------------------------------------------------------------------------------------------------


#: ``a @ b`` as Dynamo records it: the operator, ``torch.matmul`` or the method ``a.matmul(b)``; ``mm`` and
#: ``bmm`` are its 2-D and 3-D forms. Pass both to :func:`is_call`.
MATMUL_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.mm, torch.bmm})
MATMUL_METHODS = frozenset({"matmul", "mm", "bmm"})


def is_call(n, functions=(), methods=()) -> bool:
    """Whether ``n`` is a node calling one of ``functions`` or a method named in ``methods``."""
    return isinstance(n, fx.Node) and (n.op == "call_function" and n.target in functions
                                       or n.op == "call_method" and n.target in methods)


@dataclass
class Candidate:
    """A node a pass recognised: its LayerInfo and either what the rewrite needs or why it cannot be done."""

    node: fx.Node
    info: LayerInfo
    op_before: str
    needs_weights: bool  # True: factors come from the real weights (inference only)
    data: Dict[str, Any] = field(default_factory=dict)
    unsupported: Optional[str] = None  # reason the node cannot be rewritten at all


def replace_call(node: fx.Node, names: Sequence[str], **values) -> fx.Node:
    """Replace a call node by a new call of the same target with the arguments ``values`` changed, each where the
    call passes it (positionally, at its place in the target's argument ``names``, or by keyword). A new node
    rather than an edited one: a fused encoder layer whose nodes all remain is put back fused
    (``expand_encoder_layer.restore``)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        if len(args) > names.index(name):
            args[names.index(name)] = value
        else:
            kwargs[name] = value
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(node.target, tuple(args), kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def trace_into(graph: fx.Graph, before: fx.Node, fn: Callable, *args) -> List[fx.Node]:
    """Record ``fn(*args)`` in ``graph`` just before ``before``, the node it replaces, as the torch calls it
    makes (FX proxies stand for the graph values among ``args``), so one Python function is both a
    replacement's formula and its graph. Every new node gets ``before``'s module stack and source line, and
    the ``example_value`` that later passes and the kernel routing read, computed in the graph's fake mode.
    Returns the new nodes in graph order; the last is the result."""
    tracer = fx.proxy.GraphAppendingTracer(graph)
    known = set(graph.nodes)
    with graph.inserting_before(before):
        out = fn(*(fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a for a in args))
    values = [a.meta.get("example_value") for a in args if isinstance(a, fx.Node)]
    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None)
    meta = {k: before.meta[k] for k in ("nn_module_stack", "stack_trace") if k in before.meta}
    new = [n for n in graph.nodes if n not in known]
    assert new[-1] is out.node  # created last, so placed last before ``before``
    for n in new:
        n.meta.update(meta)
        inputs = [a.meta.get("example_value") for a in n.all_input_nodes]
        if fake_mode is None and (not inputs or any(v is None for v in inputs)):
            continue  # no example values to start from (AOT re-traces the graph anyway); scalars of the graph
            # (SymFloat) need no fake mode
        vargs, vkwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("example_value"))
        with fake_mode or contextlib.nullcontext():
            if n.op == "call_method":
                n.meta["example_value"] = getattr(vargs[0], n.target)(*vargs[1:], **vkwargs)
            else:
                n.meta["example_value"] = n.target(*vargs, **vkwargs)
    return new


_SHAPE_ONLY_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten", "split", "chunk",
    "unbind", "__getitem__", "to", "float", "half", "bfloat16", "type_as", "mul", "div", "unsqueeze",
    "squeeze", "expand", "t",
}


class PassContext:
    """Shared state of one backend call: the gm, real example inputs, grad mode, and the report rows."""

    def __init__(self, gm: fx.GraphModule, example_inputs, *, grad_enabled: bool, cache: FactorCache):
        self.gm = gm
        self.graph = gm.graph
        self.grad_enabled = grad_enabled
        self.cache = cache
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # Dynamo passes one example per placeholder, in order; anything else (a hand-made gm) falls back
        # on the fake values in meta, which is enough for shapes but not for factorising weights.
        self.real: Dict[fx.Node, Any] = {}
        if len(placeholders) == len(example_inputs):
            self.real = dict(zip(placeholders, example_inputs))
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.rows: List[Tuple[int, ReportRow]] = []
        self.row_nodes: List[Tuple[str, str]] = []
        self._used_names = set(dict(gm.named_buffers()).keys()) | set(dict(gm.named_parameters()).keys())
        self._nx: Optional[nx.DiGraph] = None
        self._names_taken: Dict[str, int] = {}
        # node -> the real weight it was derived from (keys the cache of weight-free draws per model)
        self.owners: Dict[fx.Node, torch.Tensor] = {}
        self._registered: Dict[int, Tuple[torch.Tensor, str]] = {}
        self._autocast: Optional[Dict[fx.Node, Tuple[Tuple[str, Any, bool], ...]]] = None
        self._module_paths: Optional[Dict[str, str]] = None
        self._prefixes: Optional[Dict[str, str]] = None
        # SDPA node -> a sample of its inputs on the real example (fx_passes.attention_sample), if taken
        self.attention_samples: Dict[fx.Node, Any] = {}

    # -- weights and names --------------------------------------------------------------------------
    def weight(self, node) -> Tuple[Optional[torch.Tensor], Optional[str], Optional[str]]:
        """(real tensor, fqn, None) when ``node`` is a module parameter/buffer placeholder, else
        (None, None, reason)."""
        if not isinstance(node, fx.Node):
            return None, None, "weight is not a graph value"
        if node.op != "placeholder":
            return None, None, self._computed_weight_reason(node)
        real, src = self._placeholder(node)
        is_state = isinstance(real, torch.nn.Parameter) or (
            isinstance(src, str) and ("_parameters[" in src or "_buffers[" in src)
        )
        if not isinstance(real, torch.Tensor) or not is_state:
            return None, None, "weight is a graph input, not a module parameter"
        fqn = self.fqn(src) if isinstance(src, str) else None
        return real, fqn or node.name, None

    def fqn(self, source_name: str) -> Optional[str]:
        """:func:`source_to_fqn`, in the module that was compiled. After a graph break inside a submodule's
        call, Dynamo compiles that submodule's frame on its own, and its ``L['self']`` is the submodule: the
        prefix its parameters have in the compiled module (``model.`` for a Hugging Face ``LlamaModel``
        inside ``LlamaForCausalLM``) is put back, so names match those of an unbroken graph and of
        ``panther.convert``."""
        rel = source_to_fqn(source_name)
        root = _ROOT.match(source_name)
        prefix = self._source_prefixes().get(root.group(0), "") if root else ""
        return (prefix + rel if rel else prefix[:-1]) or None

    def _source_prefixes(self) -> Dict[str, str]:
        """For each source root of the graph's parameters (``L['self']``), the prefix of their names in the
        compiled module; empty when it is the compiled module or no module was compiled."""
        if self._prefixes is None:
            self._prefixes = {}
            root = compiled_root()
            if root is not None:
                names: Dict[int, str] = {}
                for name, t in [*root.named_parameters(remove_duplicate=False),
                                *root.named_buffers(remove_duplicate=False)]:
                    names.setdefault(id(t), name)
                votes: Dict[str, Counter] = {}
                for n in self.real:
                    real, src = self._placeholder(n)
                    rel = source_to_fqn(src) if isinstance(src, str) else None
                    full = names.get(id(real))
                    where = _ROOT.match(src) if rel else None
                    if where and full and (full == rel or full.endswith("." + rel)):
                        votes.setdefault(where.group(0), Counter())[full[:len(full) - len(rel)]] += 1
                self._prefixes = {r: c.most_common(1)[0][0] for r, c in votes.items()}
        return self._prefixes

    def _placeholder(self, node: fx.Node) -> Tuple[Any, Optional[str]]:
        """A placeholder's real value and Dynamo source name (``..._buffers['bias']``, say)."""
        ga = node.meta.get("grapharg")
        src = getattr(getattr(ga, "source", None), "name", None)
        if callable(src):  # older torch: Source.name() is a method
            src = src()
        real = self.real.get(node)
        if real is None and ga is not None:
            real = getattr(ga, "example", None)
        return real, src

    def buffer_value(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The value of a module buffer the graph reads (a causal triangle registered as ``bias``, say), read
        now, as the weights of a rewrite are; ``None`` for anything else."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        real, src = self._placeholder(node)
        is_buffer = isinstance(src, str) and "_buffers[" in src
        return real if is_buffer and isinstance(real, torch.Tensor) and not real.is_meta else None

    def _computed_weight_reason(self, node: fx.Node) -> str:
        """Why a weight computed in the graph is left alone, naming the parameters it is computed from (a
        ``torch.nn.utils.parametrize`` weight, weight_norm or spectral_norm, reads ``parametrizations.weight``)."""
        sources, seen, todo = [], {node}, [node]
        while todo:
            for n in todo.pop().all_input_nodes:
                if n in seen:
                    continue
                seen.add(n)
                if n.op == "placeholder":
                    fqn = self.weight(n)[1]
                    if fqn is not None:
                        sources.append(fqn)
                else:
                    todo.append(n)
        parametrized = sorted({s.split(".parametrizations.")[0] for s in sources if ".parametrizations." in s})
        if parametrized:
            return (f"weight is computed in the graph by a parametrization "
                    f"({', '.join(p + '.parametrizations' for p in parametrized)}, torch.nn.utils.parametrize), "
                    f"not a module parameter")
        if not sources:
            return f"weight is computed in the graph ({node.op} {node.name}), not a module parameter"
        names = ", ".join(sorted(sources)[:3]) + (", ..." if len(sources) > 3 else "")
        return f"weight is computed in the graph from {names}, not a module parameter"

    def module_path(self, node: fx.Node) -> Optional[str]:
        """Innermost module path of a call node from ``nn_module_stack`` (``None`` at the root)."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        return self.fqn(path)

    def layer_name(self, node: fx.Node, fqn: Optional[str], is_layer: Callable[[type], bool]) -> str:
        """The layer a weighted call belongs to: the calling module when it is such a layer (``is_layer`` of
        its class), else the weight's owner (``blocks.0.fc`` for ``blocks.0.fc.weight``). The two differ for a
        tied weight, e.g. GPT-2's ``lm_head`` applying ``transformer.wte.weight``: the caller is the module
        ``panther.convert`` swaps, so policies, overrides and seeds see one name on both paths. A module
        registered under several names is named by the first one the graph calls it by."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, (path, cls) = list(stack.items())[-1]
            if isinstance(cls, type) and is_layer(cls):
                caller = self.fqn(self._first_path(key, path))
                if caller:
                    return caller
        if fqn is not None:
            return fqn.rsplit(".", 1)[0] if fqn.endswith(".weight") and "." in fqn else fqn
        return self.module_path(node) or node.name

    def panther_owner(self, node: fx.Node) -> Optional[str]:
        """``panther.nn.RandMultiHeadAttention`` (say) when ``node`` runs inside a panther module: such a
        module is already what a policy chose (``panther.convert`` made it), so its own weights, e.g. the
        attention's projections, are not sketched again. The module compiled itself is not in Dynamo's
        ``nn_module_stack``: a call made by the code of ``panther.nn`` (the stack trace's innermost frame) counts too
        (not any file of the package: the demo's and the benchmarks' models are users' models)."""
        stack = node.meta.get("nn_module_stack")
        cls = list(stack.values())[-1][1] if stack else None
        if isinstance(cls, type) and cls.__module__.split(".")[0] == "panther":
            public = next((c for c in cls.__mro__ if c.__module__.startswith("panther.nn")), None)
            return f"panther.nn.{public.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
        frames = _FRAME.findall(node.meta.get("stack_trace") or "")
        if frames and os.path.abspath(frames[-1]).startswith(_PANTHER_NN):
            return "panther.nn." + os.path.splitext(os.path.relpath(frames[-1], _PANTHER_NN))[0].replace(os.sep, ".")
        return None

    def _first_path(self, key: str, path: str) -> str:
        """The first path the graph calls a module by. Dynamo keys ``nn_module_stack`` by the module's
        identity, with ``@n`` added for its n-th repeated call."""
        if self._module_paths is None:
            self._module_paths = {}
            for n in self.graph.nodes:
                for k, (p, _) in (n.meta.get("nn_module_stack") or {}).items():
                    self._module_paths.setdefault(k.split("@")[0], p)
        return self._module_paths.get(key.split("@")[0], path)

    def dtype_mismatch(self, node: fx.Node, W: torch.Tensor, xv) -> Optional[str]:
        """Why a weight of ``W``'s dtype cannot meet the input value ``xv`` at ``node``, or None. Inside an
        autocast region (the one around the compiled call, or the graph's own ``torch.autocast`` blocks) an
        input in the autocast dtype is fine: the sketched ops' autocast kernels cast the factors as ATen's
        linear and conv cast the weight."""
        if not isinstance(xv, torch.Tensor) or W.dtype == xv.dtype:
            return None
        if W.is_floating_point() and xv.dtype == self.autocast_dtype(node, xv.device.type):
            return None
        return f"weight dtype {W.dtype} differs from input dtype {xv.dtype}"

    def autocast_dtype(self, node: fx.Node, device_type: str):
        """The autocast dtype in force for ``device_type`` where ``node`` runs, or None (autocast off): the
        innermost of the graph's ``_enter_autocast`` regions around it, else the state at compile time."""
        if self._autocast is None:
            self._autocast, stack, entered = {}, (), {}
            for n in self.graph.nodes:
                if n.target is torch.amp.autocast_mode._enter_autocast:
                    entered[n] = stack
                    stack = stack + ((n.args[0], n.args[1], bool(n.args[2])),)
                elif n.target is torch.amp.autocast_mode._exit_autocast:
                    stack = entered.get(n.args[0], stack)
                self._autocast[n] = stack
        for dev, dtype, enabled in reversed(self._autocast.get(node, ())):
            if dev == device_type:
                return (dtype or torch.get_autocast_dtype(dev)) if enabled else None
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    def unique_layer_name(self, name: str) -> str:
        """Layer names are unique within one report (a module called twice gets ``#1``, ``#2``...)."""
        n = self._names_taken.get(name, 0)
        self._names_taken[name] = n + 1
        return name if n == 0 else f"{name}#{n}"

    # -- new tensors on the gm ----------------------------------------------------------------------
    def add_constant(self, base: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        """Register ``tensor`` as a gm buffer (with its ConstantSource) and return a get_attr node.

        The same tensor object (a module called twice shares its cached factors) is registered once."""
        known = self._registered.get(id(tensor))
        if known is not None and known[0] is tensor:
            name = known[1]
        else:
            name = self._register(base, tensor)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        fake = self._fake(tensor)
        if fake is not None:
            node.meta["example_value"] = fake
        return node

    def _register(self, base: str, tensor: torch.Tensor) -> str:
        stem = "_panther_" + re.sub(r"\W", "_", base).strip("_")
        name, i = stem, 0
        while name in self._used_names or hasattr(self.gm, name):
            i += 1
            name = f"{stem}_{i}"
        self._used_names.add(name)
        self.gm.register_buffer(name, tensor)
        self._registered[id(tensor)] = (tensor, name)
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            from torch._dynamo.source import ConstantSource

            sources[name] = ConstantSource(name)
        return name

    def _fake(self, tensor):
        """A FakeTensor of ``tensor`` in the graph's fake mode (meta must never hold real tensors)."""
        if not hasattr(self, "_fake_mode"):
            self._fake_mode = None
            for n in self.graph.nodes:
                fm = getattr(n.meta.get("example_value"), "fake_mode", None)
                if fm is not None:
                    self._fake_mode = fm
                    break
        if self._fake_mode is None:
            return None
        try:
            return self._fake_mode.from_tensor(tensor, static_shapes=True)
        except Exception:  # noqa: BLE001 - meta is a nicety; AOT re-traces anyway
            return None

    # -- networkx view ------------------------------------------------------------------------------
    @property
    def nx(self) -> nx.DiGraph:
        """Dataflow DiGraph over the current nodes (rebuilt after each rewrite)."""
        if self._nx is None:
            G = nx.DiGraph()
            for n in self.graph.nodes:
                G.add_node(n)
                for inp in n.all_input_nodes:
                    G.add_edge(inp, n)
            self._nx = G
        return self._nx

    def graph_changed(self):
        self._nx = None

    def producers(self, node: fx.Node, is_producer: Callable[[fx.Node], bool]) -> List[fx.Node]:
        """Nearest upstream nodes satisfying ``is_producer``, looking through shape-only ops
        (view/transpose/split/getitem...): e.g. the projections that feed an attention's q, k, v."""
        G = self.nx
        found, seen, frontier = [], {node}, [node]
        while frontier:
            nxt = []
            for n in frontier:
                for p in G.predecessors(n):
                    if p in seen:
                        continue
                    seen.add(p)
                    if is_producer(p):
                        found.append(p)
                    elif _is_shape_only(p):
                        nxt.append(p)
            frontier = nxt
        return sorted(found, key=lambda n: self.order.get(n, 0))

    # -- report --------------------------------------------------------------------------------------
    def record(self, cand: Candidate, row: ReportRow):
        self.rows.append((self.order.get(cand.node, len(self.order)), row))
        self.row_nodes.append((cand.node.name, row.name))  # for the report's picture (graph_view)


def _is_shape_only(n: fx.Node) -> bool:
    import operator

    if n.op == "call_method":
        return n.target in _SHAPE_ONLY_METHODS
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target is operator.getitem or name in _SHAPE_ONLY_METHODS
    return False


def common_prefix(names: List[str]) -> Optional[str]:
    """Longest shared dotted prefix of module paths (``a.attn.q``, ``a.attn.k`` -> ``a.attn``)."""
    if not names:
        return None
    parts = [n.split(".") for n in names]
    out = []
    for group in zip(*parts):
        if all(g == group[0] for g in group):
            out.append(group[0])
        else:
            break
    return ".".join(out) or None


def numel(shape) -> int:
    return _prod(shape) if shape is not None else 0


def spec_key(spec: SketchSpec) -> Tuple:
    act = getattr(spec, "act_gram", None)
    return (spec.num_terms, spec.low_rank, spec.num_random_features, spec.kernel_fn, spec.init, spec.seed,
            None if act is None else id(act))


@contextlib.contextmanager
def single_threaded():
    """Run the compile-time factorisations on one intra-op thread, then restore the setting.

    The matrices are small (one layer's weight), so threads buy little, while a multi-threaded LAPACK SVD
    on a busy machine can stall on spinning thread barriers: measured here, 8 SVDs of 256-1024 wide
    float64 weights took 17 s on 2 threads under load vs 0.3 s on 1.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def generator_for(seed: Optional[int]) -> Optional[torch.Generator]:
    """A CPU generator for a per-layer seed, exactly as ``panther.nn`` builds one from ``seed=``."""
    return None if seed is None else torch.Generator().manual_seed(seed)
