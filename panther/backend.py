"""The ``"panther"`` torch.compile backend.

Registered only through the ``torch_dynamo_backends`` entry point in pyproject.toml, so
``torch.compile(model, backend="panther", options={...})`` works without importing panther first (this
module must never call ``register_backend`` itself: Dynamo would then see the name twice). Importing it is
cheap; the passes and Inductor are imported on the first compile.

What one backend call does, for each graph Dynamo captures:

1. run panther's FX passes (``fx_passes``): find linear / conv2d / attention nodes, ask the policy,
   rewrite the accepted ones into panther ops. Weight-derived rewrites (linear, conv2d) only when grad is
   disabled (inference); with grad enabled they stay dense with the reason ``fx_passes.TRAINING_REASON`` (and a
   warning).
2. deliver the graph diff report (``options["report"]`` callable, ``panther.last_report()``, INFO log on
   the ``"panther"`` logger);
3. compile the graph: Inductor with panther's decompositions (default), or ``aot_eager`` / ``eager``.

The options (``torch.compile(..., options={...})``) are documented on :func:`panther_backend`; their
keys are :data:`OPTIONS`.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Optional

__all__ = ["panther_backend", "check_options", "OPTIONS", "COMPILERS"]

log = logging.getLogger("panther")

#: The accepted values of ``options["compiler"]``, i.e. what compiles the graph after panther's rewrite.
COMPILERS = ("inductor", "aot_eager", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The keys ``options=`` accepts (any other raises ``ValueError``); each is described on
#: :func:`panther_backend`.
OPTIONS = ("policy", "overrides", "report", "compiler", "mode", "inductor_config", "decompose", "measure_attention")


def check_options(options=None, mode=None):
    """The backend's ``options`` validated, as a plain dict with every key (ValueError / TypeError name the key
    and what is allowed). The backend runs this at the first call of the compiled model, where Dynamo wraps
    its error in ``torch._dynamo.exc.BackendCompilerFailed``; call it yourself to check options where you
    build them."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"panther backend: options must be a dict with keys {OPTIONS}, got {type(options).__name__}")
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ValueError(f"panther backend: unknown option(s) {unknown}; allowed keys are {OPTIONS}")
    opts = {"policy": None, "overrides": None, "report": None, "compiler": "inductor", "mode": mode,
            "inductor_config": None, "decompose": True, "measure_attention": True}
    opts.update(options)
    if mode is not None and options.get("mode") not in (None, mode):
        raise ValueError(f"panther backend: mode given twice ({mode!r} and options['mode']={options['mode']!r})")
    pol = opts["policy"]
    if pol is not None and not callable(pol) and not isinstance(pol, Mapping):
        raise TypeError(
            "panther backend: options['policy'] must be None, a callable LayerInfo -> SketchSpec | None, or a "
            f"dict of fnmatch patterns -> SketchSpec (or a dict of its fields) | 'skip'; got {type(pol).__name__}"
        )
    if opts["overrides"] is not None and not isinstance(opts["overrides"], Mapping):
        raise TypeError(f"panther backend: options['overrides'] must be a dict, got {type(opts['overrides']).__name__}")
    if opts["report"] is not None and not callable(opts["report"]):
        raise TypeError(f"panther backend: options['report'] must be a callable, got {type(opts['report']).__name__}")
    if opts["compiler"] not in COMPILERS:
        raise ValueError(f"panther backend: options['compiler'] must be one of {COMPILERS}, got {opts['compiler']!r}")
    if opts["mode"] is not None and opts["mode"] not in MODES:
        raise ValueError(f"panther backend: mode must be one of {MODES}, got {opts['mode']!r}")
    if opts["inductor_config"] is not None and not isinstance(opts["inductor_config"], Mapping):
        raise TypeError(
            f"panther backend: options['inductor_config'] must be a dict, got {type(opts['inductor_config']).__name__}"
        )
    for key in ("decompose", "measure_attention"):
        if not isinstance(opts[key], bool):
            raise TypeError(f"panther backend: options[{key!r}] must be a bool, got {type(opts[key]).__name__}")
    if opts["compiler"] != "inductor" and (opts["mode"] not in (None, "default") or opts["inductor_config"]):
        raise ValueError("panther backend: 'mode' and 'inductor_config' apply only with options['compiler']='inductor'")
    if opts["inductor_config"]:
        import torch._inductor.config as inductor_config

        unknown = sorted(set(opts["inductor_config"]) - set(inductor_config.get_config_copy()))
        if unknown:
            raise ValueError(f"panther backend: options['inductor_config'] has unknown key(s) {unknown}; the keys "
                             f"are torch._inductor.config's (dotted for nested ones, e.g. 'triton.cudagraphs')")
    _policy(opts)   # a dict policy's entries are checked as it is resolved
    return opts


def _policy(opts):
    """The policy the options describe, ``overrides`` in front."""
    from .policy import resolve_policy, with_overrides

    return with_overrides(opts["policy"], opts["overrides"]) if opts["overrides"] else resolve_policy(opts["policy"])


def panther_backend(gm, example_inputs, *, options=None, mode=None):
    """Dynamo backend: sketch the graph as the policy says, report, then compile (Inductor by default).

    Not called directly: ``torch.compile(model, backend="panther", options={...})`` calls it once per
    graph Dynamo captures (graph breaks, recompiles and DDP's bucket splits each give a separate call and
    a separate report). From a source checkout that is not pip-installed, pass the function itself:
    ``torch.compile(model, backend=panther.backend.panther_backend)``.

    Options (every key is optional; the allowed keys are :data:`OPTIONS`):

    ``policy`` (default ``None``)
        Which layers to sketch and how: ``None`` (the default policy, which sketches a layer where that at
        least halves its FLOPs), a callable ``LayerInfo -> SketchSpec | None`` (for example an
        :class:`panther.budget.ErrorBudgetPolicy`), or a dict of fnmatch patterns on layer name or kind
        -> ``SketchSpec`` | ``"skip"`` | ``"default"`` (see :mod:`panther.policy`).
    ``overrides`` (default ``None``)
        Dict of name/kind patterns -> ``SketchSpec`` | ``"skip"``, consulted before ``policy``
        (per-layer exceptions to any policy).
    ``report`` (default ``None``)
        Callable receiving each graph's :class:`~panther.report.GraphDiffReport` once the graph is compiled
        (when Dynamo restarts a compile, as it does to specialise a float under dynamic shapes, only the
        attempt it keeps reports). The report is also kept as :func:`panther.last_report` and logged at
        INFO on the ``"panther"`` logger.
    ``compiler`` (default ``"inductor"``)
        What compiles the rewritten graph (:data:`COMPILERS`): ``"inductor"`` (with panther's
        decompositions), ``"aot_eager"`` (AOTAutograd without code generation; quick, for tests) or
        ``"eager"`` (run the rewritten graph as it is).
    ``mode`` (default ``None``)
        Inductor mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"`` or
        ``"max-autotune-no-cudagraphs"``. ``torch.compile(mode=...)`` reaches the backend as the ``mode``
        argument when no ``options`` are given (``torch.compile`` refuses both); two different modes are
        an error. Only with ``compiler="inductor"``.
    ``inductor_config`` (default ``None``)
        Dict of Inductor config patches for this compile only (``compile_fx``'s ``config_patches``).
        Only with ``compiler="inductor"``.
    ``decompose`` (default ``True``)
        Inductor only. Give Inductor panther's decompositions of its ops (the sketched linear as
        ``mm``/``addmm`` calls, the sketched conv as a convolution plus a channel-mix GEMM) so that it
        fuses bias, activations and residual adds around them, and run CUDA attention, and the CUDA
        sketched convs the tap GEMM serves, through panther's Triton kernels
        (``inductor_ext.kernel_routing``), which Inductor inlines. ``False`` keeps the ops opaque (their
        C++ kernels).
    ``measure_attention`` (default ``True``)
        Before rewriting a graph with attention calls, run it once on the example inputs (no grad, RNG
        restored) to measure how far random features are from exact attention there: the report shows
        it, policies read ``info.extra["output_error"]``, and the default policy keeps attention exact
        above ``DEFAULT_MAX_ATTENTION_ERROR``. ``False`` skips that run (no error; FLOPs alone decide).

    Weight-bearing rewrites (linear, conv2d) happen only with grad disabled; with grad enabled those
    layers stay dense with the reason ``fx_passes.TRAINING_REASON`` and a warning. Attention rewrites are applied
    in both modes.

    Args:
        gm: the ``torch.fx.GraphModule`` Dynamo captured (rewritten in place).
        example_inputs: its example inputs (the real parameters among them).
        options: the options above (``None``: all defaults).
        mode: the ``torch.compile`` mode, when given there instead of in ``options``.

    Returns:
        The compiled callable for ``gm``.

    Raises:
        ValueError: an unknown option key, an unknown ``compiler`` or ``mode``, ``mode`` given twice with
            different values, ``mode``/``inductor_config`` with a compiler other than Inductor, an
            ``inductor_config`` key that ``torch._inductor.config`` lacks, or a bad policy entry value.
        TypeError: an option of the wrong type (``policy`` not None/callable/dict, ``overrides`` or
            ``inductor_config`` not a dict, ``report`` not callable, ``decompose`` or ``measure_attention``
            not a bool, a policy entry that is not a SketchSpec, a dict of its fields or ``"skip"``).
        (Through ``torch.compile`` these arrive wrapped in Dynamo's ``BackendCompilerFailed``; see
        :func:`check_options`.)
    """
    opts = check_options(options, mode)

    import torch

    from torch._dynamo.exc import RestartAnalysis

    import fx_passes

    report = fx_passes.run_passes(gm, example_inputs, policy=_policy(opts), grad_enabled=torch.is_grad_enabled(),
                                  measure_attention=opts["measure_attention"])
    report.graph_break = graph_break()
    _warn_unmatched(opts, report)
    try:
        compiled = _compile(gm, example_inputs, opts)
    except RestartAnalysis:
        raise  # Dynamo traces the frame again and calls the backend again, which reports that graph
    except BaseException:
        _publish(report, opts)  # what was rewritten helps to read the error
        raise
    _publish(report, opts)
    return compiled


def _warn_unmatched(opts, report):
    """Warn about dict policy entries that match no layer of this graph (most likely a typo, which would leave
    layers silently dense), as ``panther.convert`` does for the model."""
    from panther.policy import unmatched_entries
    from panther.report import module_of

    layers = [(module_of(r.name), r.kind) for r in report.rows]
    for key in ("policy", "overrides"):
        table = opts[key]
        unmatched = unmatched_entries(table, layers) if isinstance(table, Mapping) and layers else []
        if unmatched:
            warnings.warn(f"panther backend: options[{key!r}] entries that match no layer of this graph: {unmatched}; "
                          f"entries match a layer's module path (e.g. {layers[0][0]!r}) or kind ('linear', "
                          f"'conv2d', 'attention'); a model Dynamo splits may have the layer in another graph",
                          UserWarning, stacklevel=2)


#: what to do about graph breaks PyTorch's own modules make, by the function the break is in (the first one only
#: for a mask from outside the graph, or where the substitute of _register_is_causal_hint does not see this
#: backend: a function wrapping it, say)
BREAK_ADVICE = {
    "_detect_is_causal_mask": "pass is_causal=True or False with the mask to nn.TransformerEncoder (tgt_is_causal "
                              "to nn.TransformerDecoder, src_is_causal / tgt_is_causal to nn.Transformer): left "
                              "unset, PyTorch compares the mask with the causal one value by value",
    "_canonical_mask": "give the attention mask and the key padding mask one dtype: PyTorch warns (warnings.warn) "
                       "about a float mask beside a bool one",
}


def graph_break() -> Optional[str]:
    """Where and why Dynamo ended the graph it is compiling at a graph break, with advice where the break is a
    known one of PyTorch's own modules (:data:`BREAK_ADVICE`); None when the graph ends at its frame's return.
    Dynamo keeps this in the output graph of the frame it is tracing, which the backend is called from: a
    private structure, so nothing is said if it is not there."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        reason = InstructionTranslator.current_tx().output.compile_subgraph_reason
        if reason is None or not reason.graph_break:
            return None
        lines, stack = [line.strip() for line in reason.reason.strip().splitlines()], list(reason.user_stack or [])
    except Exception:  # noqa: BLE001 - a missing note, never a failed compile
        return None
    explained = [line[len("Explanation:"):].strip() for line in lines if line.startswith("Explanation:")]
    explained = [e for e in explained if e]
    why = f"{lines[0]} ({explained[0].rstrip('.')})" if explained else lines[0]
    # where it broke, and the outermost frame of the call that got there (the model's own code)
    where = " from ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"
                          for f in ([stack[-1], stack[0]] if len(stack) > 1 else stack))
    advice = next((BREAK_ADVICE[f.name] for f in stack if f.name in BREAK_ADVICE), None)
    text = f"Dynamo ended this graph at {where or 'a graph break'}: {why}. The code after it is another graph, " \
           "or runs uncompiled (as torch.nn's own modules do after a break in them)"
    return text + (f"; to compile it, {advice}" if advice else "")


def _traced_for_panther():
    """The innermost frame Dynamo is tracing, if the graph is for this backend; else None (another backend, or
    Dynamo's private structures not as expected)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        output = InstructionTranslator.current_tx().output
        fn, tx = output.compiler_fn, output.current_tx
    except Exception:  # noqa: BLE001 - unknown: keep PyTorch's behaviour
        return None
    for _ in range(8):  # Dynamo's debug wrapper, torch.compile's wrapper, a functools.partial
        if fn is panther_backend:
            return tx
        fn = getattr(fn, "compiler_fn", None) or getattr(fn, "func", None) or getattr(fn, "__wrapped__", None)
    return None


def _mask_built_in_graph() -> bool:
    """Whether the ``mask`` of the function Dynamo is inlining for this backend is computed in the graph (it has
    no source: not an input, a module attribute or a global, whose values the compiler cannot see)."""
    tx = _traced_for_panther()
    mask = None if tx is None else tx.symbolic_locals.get("mask")
    if mask is None:
        return False
    if getattr(mask, "source", None) is not None:   # PyTorch's comparison will end the graph: say so, no report will
        log.warning("panther backend: a mask from outside the compiled code reached nn.TransformerEncoder / "
                    "nn.TransformerDecoder with is_causal unset: PyTorch compares it with the causal mask value by "
                    "value, which ends the graph, and the module then runs uncompiled, nothing in it rewritten; "
                    "to compile it, %s", BREAK_ADVICE["_detect_is_causal_mask"])
    return getattr(mask, "source", True) is None


def _register_is_causal_hint():
    """Trace ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` calls that leave ``is_causal`` unset
    without a graph break, in panther's compiles only.

    Left unset, PyTorch compares the mask with the causal one value by value (``_detect_is_causal_mask``),
    a data-dependent branch that ends Dynamo's graph; the rest of the module then runs uncompiled. Under
    this backend, for a mask computed in the graph, the answer "not known to be causal" is given instead: it
    only drops a hint, since the layers then apply the mask as given, and the attention rewrite proves such a
    mask causal from the graph itself. A mask from outside the graph, whose values the rewrite cannot read,
    and other backends get PyTorch's own function, unchanged (PyTorch then finds a causal mask causal and runs
    its causal kernel, uncompiled)."""
    import types

    import torch
    from torch.nn.modules import transformer

    detect = getattr(transformer, "_detect_is_causal_mask", None)
    if detect is None or not hasattr(torch.compiler, "substitute_in_graph"):
        return
    # the same code as a distinct function object, so that Dynamo inlines it rather than this substitute
    pytorch_detect = types.FunctionType(detect.__code__, detect.__globals__, detect.__name__,
                                        detect.__defaults__, detect.__closure__)
    built_in_graph = torch._dynamo.assume_constant_result(_mask_built_in_graph)

    @torch.compiler.substitute_in_graph(detect)
    def _detect_is_causal_mask(mask, is_causal=None, size=None):
        if is_causal is None and mask is not None and built_in_graph():
            return False
        return pytorch_detect(mask, is_causal, size)


def _publish(report, opts):
    """Make ``report`` the last one, log it and hand it to the ``report`` option. A known graph break of
    PyTorch's own modules is also a warning: everything after it runs uncompiled, in no report."""
    from panther.report import _set_last

    if report.graph_break and any(advice in report.graph_break for advice in BREAK_ADVICE.values()):
        log.warning("panther backend: %s", report.graph_break)
    _set_last(report)
    if log.isEnabledFor(logging.INFO):
        log.info("%s", report)
    if opts["report"] is not None:
        opts["report"](report)


def _compile(gm, example_inputs, opts):
    compiler = opts["compiler"]
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    import torch
    from torch._inductor.compile_fx import compile_fx

    decompositions = None
    if opts["decompose"]:
        from inductor_ext import inductor_decompositions
        from inductor_ext.kernel_routing import use_triton_kernels

        use_triton_kernels(gm)  # CUDA attention, conv, linear -> the Triton ops, which Inductor inlines

        # Inductor-scoped: {**select_decomp_table(), **panther's}, pickled by a stable key so that
        # Inductor's FX graph cache still works.
        decompositions = inductor_decompositions()
    patches = {}
    if opts["mode"] not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(opts["mode"]))
    patches.update(opts["inductor_config"] or {})
    # AOTAutograd's cache key leaves out the decomposition table: it handed graphs decomposed with
    # panther's table to compiles without it (decompose=False) and back, and would keep an older panther's
    # decompositions. Which table a compile used goes into its cache-key tag instead.
    own = decompositions.cache_tag() if decompositions is not None else "panther-decompositions:none"
    tag = torch.compiler.config.cache_key_tag
    with torch.compiler.config.patch(cache_key_tag=f"{tag}|{own}" if tag else own):
        return compile_fx(gm, example_inputs, config_patches=patches or None, decompositions=decompositions)


_register_is_causal_hint()
