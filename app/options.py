"""Command-line options shared by some of the `cascade` subcommands, and their reading
into specs (`cascade.specs`): each subcommand adds only the groups it honours.

Groups: models (--small/--large/--models, --delimiter, --template, --isolate), backends
(--backend and each backend's settings), gates (--gate and its settings, --gates), step
limits (--max-steps, --max-step-tokens, --draft-ahead). Strings become specs here; specs
become objects in `cascade.specs`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cascade
from bench.prompts import PROMPT_TEMPLATES, get_template
from cascade import Cascade, ConfigError, SolveOptions
from cascade.gates import SIGNALS
from cascade.router import load_router
from cascade.specs import (
    GATE_KINDS,
    MODES,
    GateSpec,
    ModelSpec,
    build_gates,
    canonical_gate_name,
    load_models,
    parse_gate,
    step_limits,
)

__all__ = ["add_backend_options", "add_gate_options", "add_model_options", "add_step_options",
           "build_runner", "gate_specs_from_args", "model_specs_from_args", "positive_int",
           "routers_from_args"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (--max-steps 0 is an error, not "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


# ---- registering ------------------------------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser, *, isolate: bool = True,
                      template: bool = True) -> None:
    parser.add_argument("--small", help="small model: local path, hub id, embedded:<tier> or a .gguf file")
    parser.add_argument("--large", help="large model: local path, hub id, embedded:<tier> or a .gguf file")
    parser.add_argument("--models", help="comma-separated models, cheapest first (N tiers)")
    parser.add_argument("--delimiter", default=None,
                        help="step delimiter (default: the template's, \\n\\n; the embedded pair's own \\n)")
    if template:
        parser.add_argument("--template", default=None,
                            help=f"prompt template: {', '.join(PROMPT_TEMPLATES)} (default: chat, the "
                                 "tokenizer's own chat template; embedded for the shipped pair); one "
                                 "name for every model or NAME,NAME,... one per model (a chat model and "
                                 "a base model each get theirs); sets the step delimiter unless "
                                 "--delimiter is given")
    if isolate:
        parser.add_argument("--isolate", action="store_true",
                            help="hf backend: run every model above the first in a process of its own "
                                 "(decoding.ProcessBackend), so concurrent requests use a core per model")


def add_backend_options(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    parser.add_argument("--backend", default="hf",
                        help=f"engine of the models: {', '.join(backends)} (hf: transformers in this "
                             "process; vllm: an in-process vLLM engine per model; openai: OpenAI-compatible "
                             "servers (--endpoints); llamacpp: llama-cpp-python, for .gguf files, which "
                             "use it by default)")
    if "openai" in backends:
        parser.add_argument("--endpoints", action="append", default=None, metavar="URL[,URL...]",
                            help="--backend openai: base URLs of one model's servers (several = replicas, "
                                 "round robin); give it once per model, cheapest first")
        parser.add_argument("--served-models", default=None,
                            help="--backend openai: comma-separated served model names (default: the "
                                 "model paths as given, which is what `vllm serve PATH` serves them as)")
        parser.add_argument("--api-key-env", default=None,
                            help="--backend openai: the environment variable holding the API key")
    if "vllm" in backends:
        parser.add_argument("--dtype", default="auto",
                            help="--backend vllm: weight dtype (auto, bfloat16, ...)")
        parser.add_argument("--gpu-memory", default=None,
                            help="--backend vllm: comma-separated GPU memory fraction per model "
                                 "(default: 0.9 split evenly)")
        parser.add_argument("--max-model-len", type=positive_int, default=4096,
                            help="--backend vllm: tokens of prompt + solution one request may hold")


def add_gate_options(parser: argparse.ArgumentParser, *, threshold: bool = True, gates: bool = True) -> None:
    parser.add_argument("--gate", default=None, metavar="NAME",
                        help=f"the gate at every position: {', '.join(GATE_KINDS)}")
    if gates:
        parser.add_argument("--gates", default=None,
                            help="one gate per position, comma-separated NAME[@THRESHOLD] (N models need "
                                 "N - 1), e.g. confidence@0.3,confidence@0.5")
    if threshold:
        parser.add_argument("--threshold", type=float, default=None, help="--gate: its threshold, in [0, 1]")
    parser.add_argument("--signal", default=None,
                        help=f"--gate confidence: its signal ({', '.join(SIGNALS)}; default min_prob)")
    parser.add_argument("--mode", default=None, choices=MODES,
                        help="--gate confidence: route, speculate (default) or resolve (an escalation "
                             "re-solves the problem on the next tier from the start)")
    parser.add_argument("--rewrite", choices=["step", "token"], default=None,
                        help="--gate verify: a rejected draft is rewritten by the large model "
                             "(step, the default) or corrected at its first wrong token (token)")
    parser.add_argument("--router", default=None, type=Path,
                        help="--gate advantage: its router file (cascade train-router); refused for "
                             "models it was not trained for. With --gate verify: the screen")
    parser.add_argument("--screen-threshold", type=float, default=None,
                        help="--gate verify --router FILE: verify only drafts the router gives "
                             "P(large better) >= this")


def add_step_options(parser: argparse.ArgumentParser, *, draft_ahead: bool = True) -> None:
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="steps before giving up (default: 32; the embedded pair's 16)")
    parser.add_argument("--max-step-tokens", type=positive_int, default=None,
                        help="tokens per step (default: 256; the embedded pair's 24)")
    if draft_ahead:
        parser.add_argument("--draft-ahead", action="store_true",
                            help="the small model drafts the next step while the large one verifies "
                                 "(SolveOptions.draft_ahead; saves time with --isolate)")


# ---- reading ----------------------------------------------------------------------------------

def _listed(text: str | None) -> list[str]:
    return [item.strip() for item in text.split(",")] if text else []


def model_names(args: argparse.Namespace) -> list[str]:
    """The models the options name, cheapest first (the embedded pair when none)."""
    listed = _listed(args.models)
    if listed and (args.small or args.large):
        raise ConfigError("give --models or --small/--large, not both")
    if not listed and (args.small or args.large):
        if not (args.small and args.large):
            raise ConfigError("--small and --large go together")
        listed = [args.small, args.large]
    names = listed or ["embedded:small", "embedded:large"]
    embedded = [n.startswith("embedded:") for n in names]
    if any(embedded) and not all(embedded):
        raise ConfigError("embedded:<tier> models cannot be mixed with other models; "
                          f"got --models {','.join(names)}")
    return names


def _templates(args: argparse.Namespace, names: list[str]) -> list:
    """One `bench.prompts.PromptTemplate` per model, from --template (default: chat, or
    embedded for the shipped pair)."""
    given = _listed(getattr(args, "template", None))
    embedded = names[0].startswith("embedded:")
    if not given:
        given = ["embedded" if embedded else "chat"]
    if len(given) not in (1, len(names)):
        raise ConfigError(f"--template names {len(given)} templates for {len(names)} models: give one "
                          "for every model, or one per model")
    templates = [get_template(name) for name in given] * (len(names) if len(given) == 1 else 1)
    for template in templates:
        if embedded and template.name != "embedded":
            raise ConfigError(f"--template {template.name} needs --small/--large (or --models); the embedded "
                              "pair only reads its own prompt (--template embedded)")
        if not embedded and template.name == "embedded":
            raise ConfigError("--template embedded is the shipped pair's own prompt; leave out "
                              "--small/--large to use the embedded pair")
    return templates


def model_specs_from_args(args: argparse.Namespace, *, backend: str | None = None) -> list[ModelSpec]:
    """One `ModelSpec` per model the options name, with its template, delimiter and backend."""
    names = model_names(args)
    templates = _templates(args, names)
    delimiter = args.delimiter
    if delimiter is None:
        delimiters = {t.delimiter for t in templates}
        if len(delimiters) > 1:
            raise ConfigError(f"the templates {[t.name for t in templates]} end steps differently "
                              f"({sorted(delimiters)}); the tiers share one delimiter: give --delimiter")
        delimiter = delimiters.pop()
    kind = backend or getattr(args, "backend", None) or "hf"
    isolate = getattr(args, "isolate", False)
    if isolate and kind != "hf":
        raise ConfigError(f"--isolate runs HF models in processes of their own; --backend {kind} "
                          "engines run outside this process already")
    settings: list[dict] = [{} for _ in names]
    if kind == "openai":
        endpoints = getattr(args, "endpoints", None) or []
        if not endpoints:
            raise ConfigError("--backend openai needs --endpoints URL[,URL...] once per model, cheapest "
                              "first (e.g. --endpoints http://127.0.0.1:8000 --endpoints http://127.0.0.1:8001)")
        if len(endpoints) != len(names):
            raise ConfigError(f"--endpoints is given {len(endpoints)} time(s) for {len(names)} models: "
                              "once per model, cheapest first")
        served = _listed(args.served_models) or [None] * len(names)
        if len(served) != len(names):
            raise ConfigError(f"--served-models names {len(served)} models for {len(names)}")
        for s, urls, name in zip(settings, endpoints, served, strict=False):
            s.update(endpoints=tuple(_listed(urls)), served_name=name, api_key_env=args.api_key_env)
    elif getattr(args, "endpoints", None) or getattr(args, "served_models", None):
        raise ConfigError("--endpoints and --served-models are for --backend openai")
    if kind == "vllm" and hasattr(args, "gpu_memory"):  # the commands with the vllm settings (not serve)
        shares = ([float(x) for x in _listed(args.gpu_memory)] if args.gpu_memory
                  else [0.9 / len(names)] * len(names))
        if len(shares) != len(names):
            raise ConfigError(f"--gpu-memory gives {len(shares)} fractions for {len(names)} models")
        for s, share in zip(settings, shares, strict=False):
            s.update(dtype=args.dtype, gpu_memory=share, max_model_len=args.max_model_len)
    specs = []
    for k, (name, template, extra) in enumerate(zip(names, templates, settings, strict=False)):
        model_backend = "process" if isolate and k > 0 else (None if kind == "hf" else kind)
        specs.append(ModelSpec(name, backend=model_backend, template=template.format, delimiter=delimiter,
                               **extra))
    return specs


def routers_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The router of --router FILE, loaded once, by the name gate specs give it ("")."""
    router = getattr(args, "router", None)
    return {} if router is None else {"": load_router(router)}


def gate_specs_from_args(args: argparse.Namespace, n_models: int) -> list[GateSpec] | None:
    """The gate at each position that --gate (with its settings) or --gates names; None
    when neither is given (the cascade's default gate). Settings that no gate reads are
    refused, never dropped."""
    name = args.gate
    listed = getattr(args, "gates", None)
    threshold = getattr(args, "threshold", None)
    router = getattr(args, "router", None)
    screen = getattr(args, "screen_threshold", None)
    settings_given = [flag for flag, value in (("--threshold", threshold), ("--signal", args.signal),
                                               ("--mode", args.mode), ("--rewrite", args.rewrite),
                                               ("--screen-threshold", screen)) if value is not None]
    if listed is not None:
        if name is not None:
            raise ConfigError("give --gate or --gates, not both")
        if threshold is not None:
            raise ConfigError("--threshold sets the threshold of --gate; with --gates write NAME@THRESHOLD "
                              "(e.g. --gates confidence@0.3,confidence@0.5)")
        specs = []
        for item in listed.split(","):
            spec = parse_gate(item.strip(), what="--gates item")
            if spec.kind == "confidence":
                spec = dataclasses.replace(spec, signal=spec.signal or args.signal,
                                           mode=spec.mode or args.mode)
            elif spec.kind == "advantage" and router is None:
                raise ConfigError("--gates advantage needs --router FILE (a router made by cascade "
                                  "train-router)")
            specs.append(spec)
        for flag in ("--rewrite", "--screen-threshold"):
            if flag in settings_given:
                raise ConfigError(f"{flag} is a setting of --gate verify; with --gates it is not read")
        if (args.signal or args.mode) and not any(s.kind == "confidence" for s in specs):
            raise ConfigError("--signal and --mode are settings of confidence gates; --gates names none")
        if len(specs) != n_models - 1:
            raise ConfigError(f"--gates names {len(specs)} gate(s) for {n_models} models; {n_models} models "
                              f"need {n_models - 1} (one between each model and the next)")
        return specs
    if name is None:
        if router is not None:
            raise ConfigError("--router is the router of --gate advantage; give --gate advantage")
        if settings_given:
            verb = "is a setting" if len(settings_given) == 1 else "are settings"
            raise ConfigError(f"{', '.join(settings_given)} {verb} of --gate, which is not given; give "
                              f"--gate NAME ({', '.join(GATE_KINDS)})")
        return None
    kind = canonical_gate_name(name)
    options: dict = {"threshold": threshold}
    if kind == "confidence":
        options.update(signal=args.signal, mode=args.mode)
    elif args.signal is not None or args.mode is not None:
        raise ConfigError(f"--signal and --mode are settings of --gate confidence, not of --gate {kind}")
    if kind == "advantage":
        if router is None:
            raise ConfigError("--gate advantage needs --router FILE (a router made by cascade train-router)")
        options["router"] = ""
    elif kind == "verify" and (screen is not None or router is not None):
        if screen is None:
            raise ConfigError("--gate verify with --router screens drafts: give --screen-threshold S too")
        if router is None:
            raise ConfigError("--screen-threshold S screens drafts with a router: give --router FILE too")
        options.update(router="", screen_threshold=screen)
    elif router is not None:
        raise ConfigError(f"--router is the router of --gate advantage (or the screen of --gate verify), "
                          f"not of --gate {kind}")
    if screen is not None and kind != "verify":
        raise ConfigError(f"--screen-threshold is a setting of --gate verify, not of --gate {kind}")
    if args.rewrite is not None:
        if kind != "verify":
            raise ConfigError(f"--rewrite is a setting of --gate verify, not of --gate {kind}")
        options["rewrite"] = args.rewrite
    return [GateSpec(kind, **options)] * (n_models - 1)


def solve_options(args: argparse.Namespace, specs: Sequence[ModelSpec], **extra) -> SolveOptions:
    """The solve options the step flags set, over the models' own defaults."""
    max_steps, max_step_tokens = step_limits(specs)
    return SolveOptions(max_steps=args.max_steps or max_steps,
                        max_step_tokens=args.max_step_tokens or max_step_tokens,
                        draft_ahead=bool(getattr(args, "draft_ahead", False)), **extra)


def build_runner(args: argparse.Namespace, *, gates: bool = True, backend: str | None = None,
                 **cascade_settings) -> Cascade:
    """The cascade the options describe: models (loaded once per process for the embedded
    pair on hf), gates (--gate/--gates, or the default) and solve options."""
    specs = model_specs_from_args(args, backend=backend)
    gate_specs = gate_specs_from_args(args, len(specs)) if gates else None
    options = solve_options(args, specs)
    # Before any model loads: the router file (checked against the models by the cascade).
    routed = gate_specs is not None and any(s.router is not None for s in gate_specs)
    routers = routers_from_args(args) if routed else None
    built = build_gates(gate_specs, routers) if gate_specs else None
    embedded_hf = all(s.is_embedded and s.backend in ("hf", "process") and s.template is None
                      and s.delimiter == cascade.EMBEDDED_DELIMITER for s in specs)
    if embedded_hf and not cascade_settings:
        runner = cascade.embedded_cascade(gates=built, tiers=tuple(s.embedded_tier for s in specs),
                                          isolate=any(s.backend == "process" for s in specs))
        runner.options = options
        return runner
    models = load_models(specs)
    if built is None and all(s.is_embedded for s in specs):
        built = [cascade.DEFAULT_EMBEDDED_GATE] * (len(models) - 1)
    return Cascade(models=models, gates=built, options=options, **cascade_settings)
