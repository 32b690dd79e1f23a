"""The ``"panther"`` torch.compile backend.

Registered only through the ``torch_dynamo_backends`` entry point in pyproject.toml, so
``torch.compile(model, backend="panther", options={...})`` works without importing panther first (this
module must never call ``register_backend`` itself: Dynamo would then see the name twice). Importing it is
cheap; the passes and Inductor are imported on the first compile.

What one backend call does, for each graph Dynamo captures:

1. run panther's FX passes (``fx_passes``): find linear / conv2d / attention nodes, ask the policy,
   rewrite the accepted ones into panther ops. Weight-derived rewrites (linear, conv2d) only when grad is
   disabled (inference); with grad enabled they stay dense with the reason "training: use panther.convert".
2. deliver the graph diff report (``options["report"]`` callable, ``panther.last_report()``, INFO log on
   the ``"panther"`` logger);
3. compile the graph: Inductor with panther's decompositions (default), or ``aot_eager`` / ``eager``.

Options (``torch.compile(..., options={...})``; see docs/compile.md):

=================  ============================================================  ====================
key                meaning                                                       default
=================  ============================================================  ====================
``policy``         None (default policy), callable LayerInfo -> SketchSpec|None,  None
                   or dict of fnmatch patterns -> SketchSpec | "skip"
``overrides``      dict name/kind pattern -> SketchSpec | "skip", consulted first  {}
``report``         callable receiving each GraphDiffReport                       None
``compiler``       "inductor", "aot_eager" or "eager" (no AOT: fastest, tests)    "inductor"
``mode``           Inductor mode ("default", "reduce-overhead", "max-autotune",  None
                   "max-autotune-no-cudagraphs")
``inductor_config`` dict of Inductor config patches (compile_fx config_patches)   {}
``decompose``      Inductor only: decompose panther's linear/conv ops into aten  True
                   GEMMs/convs, and run CUDA attention through the fused Triton
                   kernels (``inductor_ext.kernel_routing``)
=================  ============================================================  ====================
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

__all__ = ["panther_backend", "OPTIONS", "COMPILERS"]

log = logging.getLogger("panther")

COMPILERS = ("inductor", "aot_eager", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIONS = ("policy", "overrides", "report", "compiler", "mode", "inductor_config", "decompose")


def _check_options(options, mode):
    """Validated options as a plain dict (ValueError / TypeError name the key and what is allowed)."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"panther backend: options must be a dict with keys {OPTIONS}, got {type(options).__name__}")
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ValueError(f"panther backend: unknown option(s) {unknown}; allowed keys are {OPTIONS}")
    opts = {"policy": None, "overrides": None, "report": None, "compiler": "inductor", "mode": mode,
            "inductor_config": None, "decompose": True}
    opts.update(options)
    if mode is not None and options.get("mode") not in (None, mode):
        raise ValueError(f"panther backend: mode given twice ({mode!r} and options['mode']={options['mode']!r})")
    pol = opts["policy"]
    if pol is not None and not callable(pol) and not isinstance(pol, Mapping):
        raise TypeError(
            "panther backend: options['policy'] must be None, a callable LayerInfo -> SketchSpec | None, or a "
            f"dict of fnmatch patterns -> SketchSpec | 'skip'; got {type(pol).__name__}"
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
    if not isinstance(opts["decompose"], bool):
        raise TypeError(f"panther backend: options['decompose'] must be a bool, got {type(opts['decompose']).__name__}")
    if opts["compiler"] != "inductor" and (opts["mode"] not in (None, "default") or opts["inductor_config"]):
        raise ValueError("panther backend: 'mode' and 'inductor_config' apply only with options['compiler']='inductor'")
    return opts


def panther_backend(gm, example_inputs, *, options=None, mode=None):
    """Dynamo backend: sketch the graph as the policy says, report, then compile (Inductor by default)."""
    opts = _check_options(options, mode)

    import torch

    import fx_passes
    from panther.policy import with_overrides
    from panther.report import _set_last

    policy = opts["policy"]
    if opts["overrides"]:
        policy = with_overrides(policy, opts["overrides"])
    report = fx_passes.run_passes(gm, example_inputs, policy=policy, grad_enabled=torch.is_grad_enabled())
    _set_last(report)
    if log.isEnabledFor(logging.INFO):
        log.info("%s", report)
    if opts["report"] is not None:
        opts["report"](report)
    return _compile(gm, example_inputs, opts)


def _compile(gm, example_inputs, opts):
    compiler = opts["compiler"]
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    from torch._inductor.compile_fx import compile_fx

    decompositions = None
    if opts["decompose"]:
        from inductor_ext import inductor_decompositions
        from inductor_ext.kernel_routing import use_triton_kernels

        use_triton_kernels(gm)  # CUDA attention -> the fused Triton op, which Inductor inlines

        # Inductor-scoped: {**select_decomp_table(), **panther's}, pickled by a stable key so that
        # Inductor's FX graph cache still works.
        decompositions = inductor_decompositions()
    patches = {}
    if opts["mode"] not in (None, "default"):
        import torch

        patches.update(torch._inductor.list_mode_options(opts["mode"]))
    patches.update(opts["inductor_config"] or {})
    return compile_fx(gm, example_inputs, config_patches=patches or None, decompositions=decompositions)
