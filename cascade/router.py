"""The advantage router (Arbitrage-style): learn when the large model's step would be
meaningfully better than the small model's draft, from features known at decision time.

This module owns

- the decision-time features of a draft (`FeatureSpec`, `step_features`): the small
  model's confidence signals, the step index, the draft length and a fixed random
  projection of the small model's last hidden state;
- data collection (`collect_router_data`): along the small model's own trajectory of
  each training problem, the small draft and the large model's step from the same
  prefix, both scored by a `cascade.scorers.StepScorer`; label = score(large) -
  score(small) > tau. Rows are appended to a JSONL file as they come (resumable);
- training (`train_router`): class-balanced, L2-regularised logistic regression
  (numpy, Newton steps) with a held-out split by problem, reporting AUROC and the
  fraction of the oracle's advantage captured at the oracle's escalation rate;
- the saved `Router` (torch file with its feature spec, projection, tau, metrics and
  the names + fingerprints of the two models it was trained for; loading it for other
  models is refused).

`cascade.gates.AdvantageGate` turns a Router into a gate. This module knows nothing
about any task; task-specific scorers live outside `cascade`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import auroc
from cascade.answer import extract_answer
from cascade.errors import ConfigError
from cascade.gates import Confidence, GateState
from cascade.scorers import StepScorer
from cascade.specs import ModelSpec, load_model
from decoding import Backend, ModelInfo, ScoreRequest, StepOutput, StepRequest

__all__ = [
    "FeatureSpec",
    "RouterDataset",
    "RouterFileError",
    "RouterMetrics",
    "Router",
    "step_features",
    "ReaderSessions",
    "decision_features",
    "check_router_models",
    "collect_router_data",
    "heldout_split",
    "heldout_metrics",
    "load_router",
    "load_router_data",
    "register_router_format",
    "ROUTER_LOADERS",
    "train_router",
    "fit_logistic",
]

# Scalar features, in order. Log of the smallest token probability rather than the
# probability itself: the informative range is near 0, where a linear model sees nothing.
SCALAR_FEATURES: tuple[str, ...] = ("mean_logprob", "min_logprob", "mean_entropy",
                                    "first_k_mean_logprob", "step_index", "draft_tokens")
_MIN_LOGPROB_FLOOR = -30.0
_CONFIDENCE_K = 4  # first-k window; the runtime uses 4 for gates with probe_tokens=0
DATA_FORMAT = "stepcascade-router-data-v1"
ROUTER_FORMAT = "stepcascade-router-v1"


class RouterFileError(ConfigError):
    """A router or router-data file cannot be used: other models, other settings, corrupt."""


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a router reads.

    hidden_size: the small model's hidden size (length of `StepOutput.hidden`).
    projection_dim: the hidden state is projected to this many dimensions by a fixed
        Gaussian matrix drawn from `projection_seed` (0 = no hidden-state features).
    reader: {"name", "fingerprint"} of a reader model, or None. With one, two more
        features come last: the mean and the smallest log-probability of the draft under
        the reader given the context (one scoring pass of a model cheaper than the large
        one; the router loads it by name and checks its fingerprint).
    """

    hidden_size: int
    projection_dim: int = 16
    projection_seed: int = 0
    scalars: tuple[str, ...] = SCALAR_FEATURES
    reader: dict | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "projection_dim", "projection_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.projection_dim > 0 and self.hidden_size < 1:
            raise ConfigError("projection_dim > 0 needs hidden_size >= 1")
        unknown = set(self.scalars) - set(SCALAR_FEATURES)
        if unknown:
            raise ConfigError(f"unknown scalar features {sorted(unknown)}; known: {SCALAR_FEATURES}")
        if self.reader is not None and (not isinstance(self.reader, dict)
                                        or set(self.reader) != {"name", "fingerprint"}):
            raise ConfigError(f"reader must be {{'name', 'fingerprint'}} or None, got {self.reader!r}")

    @property
    def size(self) -> int:
        return len(self.scalars) + self.projection_dim + (2 if self.reader else 0)

    def projection(self) -> np.ndarray:
        """The fixed projection matrix, shape (hidden_size, projection_dim), rows scaled so
        a projected coordinate has the hidden state's scale."""
        rng = np.random.default_rng(self.projection_seed)
        matrix = rng.standard_normal((self.hidden_size, self.projection_dim))
        return matrix / math.sqrt(max(1, self.hidden_size))

    def to_json(self) -> dict:
        data = {"hidden_size": self.hidden_size, "projection_dim": self.projection_dim,
                "projection_seed": self.projection_seed, "scalars": list(self.scalars)}
        if self.reader is not None:  # only then: specs written before readers read back equal
            data["reader"] = dict(self.reader)
        return data

    @classmethod
    def from_json(cls, data: dict) -> FeatureSpec:
        return cls(int(data["hidden_size"]), int(data["projection_dim"]), int(data["projection_seed"]),
                   tuple(data["scalars"]), dict(data["reader"]) if data.get("reader") else None)


def _reader_features(logprobs: Sequence[float]) -> np.ndarray:
    """The reader's two features of a draft: mean and smallest log-probability (floored)."""
    if not logprobs:
        return np.zeros(2)
    return np.array([math.fsum(logprobs) / len(logprobs), max(_MIN_LOGPROB_FLOOR, min(logprobs))])


def step_features(spec: FeatureSpec, projection: np.ndarray, confidence: Confidence,
                  step_index: int, output: StepOutput, reader_logprobs: Sequence[float] | None = None
                  ) -> np.ndarray:
    """Decision-time features of one draft, shape (spec.size,). A pure function of its
    arguments (deterministic). reader_logprobs: the draft's log-probabilities under the
    spec's reader (needed when it has one). Raises ConfigError when hidden-state features
    are asked for and the draft carries no hidden state (the backend was not asked for it)."""
    if spec.reader is not None and reader_logprobs is None:
        raise ConfigError(f"the router reads {spec.reader['name']}'s log-probabilities of the draft; "
                          "none were given")
    values = {
        "mean_logprob": confidence.mean_logprob,
        "min_logprob": max(_MIN_LOGPROB_FLOOR, math.log(confidence.min_prob)) if confidence.min_prob > 0
        else _MIN_LOGPROB_FLOOR,
        "mean_entropy": confidence.mean_entropy,
        "first_k_mean_logprob": confidence.first_k_mean_logprob,
        "step_index": float(step_index),
        "draft_tokens": float(output.generated_tokens),
    }
    parts = [np.array([values[name] for name in spec.scalars], dtype=np.float64)]
    if spec.projection_dim > 0:
        if output.hidden is None:
            raise ConfigError("the router reads the small model's hidden state, but the draft has none: "
                              "the backend must be asked for it (StepRequest.return_hidden; the runtime "
                              "does this for gates with requires_hidden=True)")
        hidden = np.asarray(output.hidden, dtype=np.float64)
        if hidden.shape != (spec.hidden_size,):
            raise ConfigError(f"the router was trained on hidden states of size {spec.hidden_size}, "
                              f"this model's has size {hidden.shape[0]}")
        parts.append(hidden @ projection)
    if spec.reader is not None:
        parts.append(_reader_features(reader_logprobs))
    return np.concatenate(parts)


class ReaderSessions:
    """How a router's reader scores drafts at decision time: under one request id per
    problem, so the reader's cache holds the context from one step to the next (the
    oldest `keep` ids are released)."""

    def __init__(self, backend: Backend, keep: int = 256) -> None:
        self.backend = backend
        self.keep = keep
        # Tokens the reader has fed (prefill + scored): its compute is not a tier's, so the
        # runtime's costs do not include it; this is how to account for it.
        self.tokens = 0
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def logprobs(self, state: GateState) -> tuple[float, ...]:
        request_id = "router-reader-" + hashlib.sha256(state.problem.encode()).hexdigest()[:16]
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.keep:
            self.backend.release(self._ids.popitem(last=False)[0])
        request = ScoreRequest(request_id, state.problem, state.context, state.output.text)
        scored = self.backend.score_steps([request])[0]
        self.tokens += scored.prefill_tokens + scored.scored_tokens
        return scored.logprobs


def decision_features(spec: FeatureSpec, projection: np.ndarray, reader: ReaderSessions | None,
                      state: GateState) -> np.ndarray:
    """`step_features` of the draft a gate is judging, with the reader's log-probabilities
    when the spec has a reader."""
    read = None
    if spec.reader is not None:
        if reader is None:
            raise ConfigError(f"this router reads {spec.reader['name']}'s log-probabilities of the draft, "
                              "but "
                              "has no reader attached: load it with load_router (which loads the reader)")
        read = reader.logprobs(state)
    return step_features(spec, projection, state.confidence, state.step_index, state.output, read)


# ---- data collection ----------------------------------------------------------------------

def _strip_delimiter(text: str, delimiter: str) -> str:
    return text[: -len(delimiter)] if delimiter and text.endswith(delimiter) else text


def _reader_record(reader: Backend | None) -> dict | None:
    return None if reader is None else {"name": reader.info.name, "fingerprint": reader.info.fingerprint}


def _model_record(info: ModelInfo) -> dict:
    return {"name": info.name, "fingerprint": info.fingerprint, "entropy": getattr(info, "entropy", "exact")}


def _data_header(small: Backend, large: Backend, scorer: StepScorer, spec: FeatureSpec,
                 max_steps: int, max_step_tokens: int, skip_perfect: bool) -> dict:
    return {"format": DATA_FORMAT, "models": [_model_record(small.info), _model_record(large.info)],
            "scorer": scorer.name, "spec": spec.to_json(), "max_steps": max_steps,
            "max_step_tokens": max_step_tokens, "skip_perfect": skip_perfect}


def _read_jsonl_resumable(path: Path) -> tuple[list[dict], int]:
    """Whole JSON lines of `path` and the byte length they take (a cut-short last line,
    left by a killed run, is not counted)."""
    data = path.read_bytes()
    rows, keep, offset = [], 0, 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        if newline < 0:
            break  # the last write was cut short
        line = data[offset:newline]
        try:
            rows.append(json.loads(line))
        except ValueError:
            if newline + 1 == len(data):
                break
            raise RouterFileError(f"{path}: line {len(rows) + 1} is not JSON; the file is corrupt") from None
        offset = keep = newline + 1
    return rows, keep


def collect_router_data(small: Backend, large: Backend, problems: Sequence[str], scorer: StepScorer,
                        path: str | Path, *, projection_dim: int = 16, projection_seed: int = 0,
                        max_steps: int = 32, max_step_tokens: int = 256, skip_perfect: bool = False,
                        reader: Backend | None = None,
                        progress: Callable[[int, int], None] | None = None) -> RouterDataset:
    """Collect router training rows for `problems`, appending one JSON line per problem to
    `path` as each is finished; re-running with the same arguments resumes (problems
    already in the file are skipped). Returns the whole dataset.

    For each step of the small model's greedy trajectory: the small draft (with its
    hidden state) and the large model's greedy step from the same prefix; both scored by
    `scorer`. The trajectory follows the small model's steps until it states an answer,
    ends, or reaches `max_steps`. max_step_tokens: per step, per model.

    skip_perfect: a draft scoring 1 (the top of every scorer's range) cannot be beaten by
    more than any tau >= 0, so the large step is not generated for it (its score is
    recorded as NaN: label 0 for every tau >= 0; training with tau < 0 is then refused).
    With an exact checker this skips most large-model calls.

    reader: a model (cheaper than the large one) whose log-probabilities of each draft
    become two more features (`FeatureSpec.reader`).
    """
    problems = list(problems)
    if not problems:
        raise ConfigError("collect_router_data needs at least one problem")
    for name, value in (("max_steps", max_steps), ("max_step_tokens", max_step_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    delimiter = small.info.step_delimiter
    if large.info.step_delimiter != delimiter:
        raise ConfigError(f"the models disagree on the step delimiter: {small.info.step_delimiter!r} "
                          f"vs {large.info.step_delimiter!r}")
    path = Path(path)
    spec: FeatureSpec | None = None
    done: dict[int, dict] = {}
    if path.exists() and path.stat().st_size > 0:
        rows, keep = _read_jsonl_resumable(path)
        if not rows or rows[0].get("format") != DATA_FORMAT:
            raise RouterFileError(f"{path} is not a router-data file; refusing to add to it")
        header = rows[0]
        spec = FeatureSpec.from_json(header["spec"])
        asked = FeatureSpec(spec.hidden_size, projection_dim if spec.hidden_size else 0, projection_seed,
                            reader=_reader_record(reader))
        expected = _data_header(small, large, scorer, asked, max_steps, max_step_tokens, skip_perfect)
        if json.loads(json.dumps(expected)) != header:
            diff = [k for k in expected if json.loads(json.dumps(expected[k])) != header.get(k)]
            raise RouterFileError(f"{path} was collected with other settings ({', '.join(diff)}); "
                                  "use another file")
        for row in rows[1:]:
            index = row.get("index")
            if not isinstance(index, int) or not 0 <= index < len(problems) \
                    or row.get("problem") != problems[index]:
                raise RouterFileError(f"{path}: problem {row.get('index')} is not the one given now; "
                                      "use another file for other problems")
            done[row["index"]] = row
        if keep < path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(keep)
    todo = [i for i in range(len(problems)) if i not in done]
    projection = spec.projection() if spec is not None else None
    if todo:
        with path.open("a", encoding="utf-8") as sink:
            for count, index in enumerate(todo, start=1):
                record, spec, projection = _collect_one(small, large, scorer, problems[index], index, spec,
                                                        projection, projection_dim, projection_seed,
                                                        max_steps, max_step_tokens, delimiter, skip_perfect,
                                                        reader)
                if sink.tell() == 0:
                    header = _data_header(small, large, scorer, spec, max_steps, max_step_tokens,
                                          skip_perfect)
                    sink.write(json.dumps(header) + "\n")
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                done[index] = record
                if progress is not None:
                    progress(count, len(todo))
    return RouterDataset.from_records([done[i] for i in sorted(done)], spec,
                                      models=(_model_record(small.info), _model_record(large.info)),
                                      scorer=scorer.name)


def _collect_one(small: Backend, large: Backend, scorer: StepScorer, problem: str, index: int,
                 spec: FeatureSpec | None, projection: np.ndarray | None, projection_dim: int,
                 projection_seed: int, max_steps: int, max_step_tokens: int, delimiter: str,
                 skip_perfect: bool, reader: Backend | None = None):
    request_id = f"router-data-{uuid.uuid4().hex}"
    context = ""
    steps = []
    try:
        for step_index in range(max_steps):
            draft = small.next_steps([StepRequest(request_id, problem, context, max_step_tokens,
                                                  return_hidden=True)])[0]
            if spec is None:
                hidden_size = len(draft.hidden) if draft.hidden is not None else 0
                spec = FeatureSpec(hidden_size, projection_dim if hidden_size else 0, projection_seed,
                                   reader=_reader_record(reader))
                projection = spec.projection()
            read = None
            if reader is not None:
                read = reader.score_steps([ScoreRequest(request_id, problem, context,
                                                        draft.text)])[0].logprobs
            small_text = _strip_delimiter(draft.text, delimiter)
            large_text, large_score = None, math.nan
            if skip_perfect:
                (small_score,) = scorer.score(problem, context, [small_text])
            if not skip_perfect or small_score < 1.0:
                rival = large.next_steps([StepRequest(request_id, problem, context, max_step_tokens)])[0]
                large_text = _strip_delimiter(rival.text, delimiter)
                if skip_perfect:
                    (large_score,) = scorer.score(problem, context, [large_text])
                else:
                    small_score, large_score = scorer.score(problem, context, [small_text, large_text])
            confidence = Confidence.of(draft, _CONFIDENCE_K)
            features = step_features(spec, projection, confidence, step_index, draft, read)
            steps.append({"step_index": step_index, "small": small_text, "large": large_text,
                          "small_score": float(small_score),
                          "large_score": None if math.isnan(large_score) else float(large_score),
                          "features": [float(x) for x in features],
                          # the draft's tokens, for routers that read the sequence (SequenceRouter)
                          "token_ids": list(draft.token_ids), "logprobs": [float(x) for x in draft.logprobs],
                          "entropies": [float(x) for x in draft.entropies]})
            context += draft.text
            if draft.stop_reason == "max_tokens":
                context += delimiter  # a step cut at max tokens still ends (as in the runtime)
            if draft.stop_reason == "eos" or extract_answer(small_text) is not None or not draft.text:
                break
    finally:
        small.release(request_id)
        large.release(request_id)
        if reader is not None:
            reader.release(request_id)
    return {"index": index, "problem": problem, "steps": steps}, spec, projection


def load_router_data(path: str | Path) -> RouterDataset:
    """A dataset collected by `collect_router_data` (JSONL), or saved by `RouterDataset.save` (.npz)."""
    path = Path(path)
    if not path.exists():
        raise RouterFileError(f"no router data at {path}")
    if path.suffix == ".npz":
        return RouterDataset.load_npz(path)
    rows, _ = _read_jsonl_resumable(path)
    if not rows or rows[0].get("format") != DATA_FORMAT:
        raise RouterFileError(f"{path} is not a router-data file")
    header = rows[0]
    return RouterDataset.from_records(rows[1:], FeatureSpec.from_json(header["spec"]),
                                      models=tuple(header["models"]), scorer=header["scorer"])


@dataclass(frozen=True, eq=False)
class RouterDataset:
    """Collected rows as arrays. n = steps.

    features: (n, spec.size); small_score, large_score: (n,); group: (n,) the problem
    index each step belongs to (held-out splits are by problem); step_index: (n,).
    The drafts' tokens, for routers that read the sequence (`SequenceRouter`), flattened:
    step i's tokens are token_ids[token_offsets[i]:token_offsets[i + 1]] (token_offsets
    (n + 1,)), with their logprobs and entropies alongside; None in files collected before
    tokens were recorded.
    """

    features: np.ndarray
    small_score: np.ndarray
    large_score: np.ndarray
    group: np.ndarray
    step_index: np.ndarray
    spec: FeatureSpec
    models: tuple[dict, ...]
    scorer: str
    token_offsets: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    token_logprobs: np.ndarray | None = None
    token_entropies: np.ndarray | None = None

    @property
    def has_tokens(self) -> bool:
        return self.token_offsets is not None

    def step_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids, logprobs, entropies) of step `index`'s draft."""
        if self.token_offsets is None:
            raise RouterFileError("this router data holds no draft tokens (collected before they were "
                                  "recorded); collect it again")
        start, end = int(self.token_offsets[index]), int(self.token_offsets[index + 1])
        return self.token_ids[start:end], self.token_logprobs[start:end], self.token_entropies[start:end]

    @property
    def advantage(self) -> np.ndarray:
        """score(large) - score(small), shape (n,); NaN where the large step was skipped
        (the draft scored 1: the advantage is <= 0 there)."""
        return self.large_score - self.small_score

    def labels(self, tau: float) -> np.ndarray:
        """Large meaningfully better: advantage > tau, shape (n,) bool."""
        return self.advantage > tau

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def from_records(cls, records: Sequence[dict], spec: FeatureSpec | None, *, models, scorer: str
                     ) -> RouterDataset:
        steps = [(r["index"], s) for r in records for s in r["steps"]]
        if spec is None or not steps:
            raise ConfigError("the router data holds no steps")
        tokens: dict = {}
        if all("token_ids" in s for _, s in steps):
            lengths = [len(s["token_ids"]) for _, s in steps]
            tokens = {"token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      "token_ids": np.array([t for _, s in steps for t in s["token_ids"]], dtype=np.int64),
                      "token_logprobs": np.array([t for _, s in steps for t in s["logprobs"]],
                                                 dtype=np.float64),
                      "token_entropies": np.array([t for _, s in steps for t in s["entropies"]],
                                                  dtype=np.float64)}
        return cls(
            features=np.array([s["features"] for _, s in steps],
                              dtype=np.float64).reshape(len(steps), spec.size),
            small_score=np.array([s["small_score"] for _, s in steps], dtype=np.float64),
            large_score=np.array([math.nan if s["large_score"] is None else s["large_score"]
                                  for _, s in steps], dtype=np.float64),
            group=np.array([i for i, _ in steps], dtype=np.int64),
            step_index=np.array([s["step_index"] for _, s in steps], dtype=np.int64),
            spec=spec, models=tuple(dict(m) for m in models), scorer=scorer, **tokens)

    def save(self, path: str | Path) -> Path:
        """Save as .npz (arrays + a JSON header)."""
        path = Path(path)
        header = json.dumps({"format": DATA_FORMAT, "spec": self.spec.to_json(), "models": list(self.models),
                             "scorer": self.scorer})
        tokens = {name: getattr(self, name) for name in _TOKEN_ARRAYS} if self.has_tokens else {}
        np.savez_compressed(path, features=self.features, small_score=self.small_score,
                            large_score=self.large_score, group=self.group, step_index=self.step_index,
                            header=np.array(header), **tokens)
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> RouterDataset:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != DATA_FORMAT:
                raise RouterFileError(f"{path} is not a router-data file")
            tokens = {name: data[name] for name in _TOKEN_ARRAYS} if "token_offsets" in data else {}
            return cls(data["features"], data["small_score"], data["large_score"], data["group"],
                       data["step_index"], FeatureSpec.from_json(header["spec"]), tuple(header["models"]),
                       header["scorer"], **tokens)


_TOKEN_ARRAYS = ("token_offsets", "token_ids", "token_logprobs", "token_entropies")


# ---- training --------------------------------------------------------------------------------

def fit_logistic(x: np.ndarray, y: np.ndarray, *, sample_weight: np.ndarray | None = None,
                 l2: float = 1e-3, max_iter: int = 100, tol: float = 1e-8) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression by Newton's method.

    x: (n, d) (standardise first); y: (n,) in {0, 1}; sample_weight: (n,), default 1.
    Minimises sum_i w_i * logloss_i / sum_i w_i + l2 / 2 * |coef|^2 (the bias is not
    penalised). Returns (coef shape (d,), bias).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = w / w.sum()
    design = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(max_iter):
        z = design @ theta
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        gradient = design.T @ (w * (p - y)) + penalty * theta
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-12)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.max(np.abs(step)) < tol:
            break
    return theta[:-1], float(theta[-1])


@dataclass(frozen=True)
class RouterMetrics:
    """Held-out figures of a trained router.

    auroc: of P(large better) against the labels. oracle_escalation_rate: fraction of
    held-out steps with label 1 (what an oracle router escalates). captured_advantage:
    sum of advantage over the router's top steps, as many as the oracle escalates,
    divided by the oracle's (the sum over label-1 steps): the fraction of the oracle's
    advantage captured at matched escalation rate. Steps whose large step was skipped
    (perfect drafts) count as advantage 0, an upper bound.
    """

    n_train: int
    n_heldout: int
    positive_rate_train: float
    positive_rate_heldout: float
    auroc: float
    oracle_escalation_rate: float
    captured_advantage: float

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        """One line for a router's summary."""
        return (f"held-out: {self.n_heldout} steps ({self.n_train} train), positive rate "
                f"{self.positive_rate_heldout:.3f}, AUROC {self.auroc:.3f}, advantage captured at the "
                f"oracle's escalation rate ({self.oracle_escalation_rate:.3f}): "
                f"{self.captured_advantage:.3f}")


def _check_two_classes(labels: np.ndarray, where: str, tau: float) -> None:
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        which = "positive (large better)" if positives else "negative (large not better)"
        raise ConfigError(f"router training needs both classes, but all {len(labels)} {where} steps are "
                          f"{which} at tau={tau:g}; collect more problems or change tau")


def captured_advantage(probability: np.ndarray, advantage: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the oracle's advantage the router captures escalating as many steps as the
    oracle (its top-k by probability, k = number of label-1 steps). Shapes (n,)."""
    k = int(labels.sum())
    oracle = float(advantage[labels].sum())
    if k == 0 or oracle <= 0:
        return math.nan
    top = np.argsort(-probability, kind="stable")[:k]
    return float(advantage[top].sum()) / oracle


def heldout_split(data: RouterDataset, *, tau: float, holdout: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels at `tau` and the held-out mask, shapes (n,): `holdout` of the problems (by
    problem, drawn with `seed`) are kept out of training for the metrics. Every router
    trainer splits here, so routers trained with the same seed are compared on the same
    steps. Raises ConfigError on bad settings or when either split has only one class."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau):
        raise ConfigError(f"tau must be a finite number, got {tau!r}")
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout!r}")
    if tau < 0 and np.isnan(data.large_score).any():
        raise ConfigError(f"tau={tau:g} < 0, but the data skipped the large step of perfect drafts "
                          "(collected with skip_perfect): recollect without it, or use tau >= 0")
    labels = data.labels(tau)
    _check_two_classes(labels, "collected", tau)
    groups = np.unique(data.group)
    if len(groups) < 2:
        raise ConfigError(f"router training needs steps of at least 2 problems for a held-out split, "
                          f"got {len(groups)}")
    rng = np.random.default_rng(seed)
    n_held = min(len(groups) - 1, max(1, round(holdout * len(groups))))
    held_groups = rng.choice(groups, size=n_held, replace=False)
    held = np.isin(data.group, held_groups)
    _check_two_classes(labels[~held], "training", tau)
    _check_two_classes(labels[held], "held-out", tau)
    return labels, held


def heldout_metrics(data: RouterDataset, labels: np.ndarray, held: np.ndarray,
                    probability_held: np.ndarray) -> RouterMetrics:
    """A router's figures on the held-out steps, from its P(large better) there."""
    return RouterMetrics(
        n_train=int((~held).sum()), n_heldout=int(held.sum()),
        positive_rate_train=float(labels[~held].mean()), positive_rate_heldout=float(labels[held].mean()),
        auroc=auroc(probability_held, labels[held]), oracle_escalation_rate=float(labels[held].mean()),
        captured_advantage=captured_advantage(probability_held, np.nan_to_num(data.advantage[held], nan=0.0),
                                              labels[held]))


def train_router(data: RouterDataset, *, tau: float = 0.0, holdout: float = 0.2, seed: int = 0,
                 l2: float = 1e-3) -> Router:
    """Train the router: class-balanced logistic regression on standardised features, with
    `holdout` of the problems (by problem, drawn with `seed`) kept out for the metrics.
    Raises ConfigError when either split has only one class."""
    labels, held = heldout_split(data, tau=tau, holdout=holdout, seed=seed)
    train = ~held
    x_train, y_train = data.features[train], labels[train]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature stays 0 after scaling
    positives = y_train.mean()
    weights = np.where(y_train, 0.5 / positives, 0.5 / (1.0 - positives))  # balanced classes
    coef, bias = fit_logistic((x_train - mean) / std, y_train, sample_weight=weights, l2=l2)
    router = Router(spec=data.spec, projection=data.spec.projection(), mean=mean, std=std, coef=coef,
                    bias=bias, models=data.models, scorer=data.scorer, tau=float(tau), metrics=None)
    metrics = heldout_metrics(data, labels, held, router.probability(data.features[held]))
    return Router(spec=router.spec, projection=router.projection, mean=mean, std=std, coef=coef, bias=bias,
                  models=data.models, scorer=data.scorer, tau=float(tau), metrics=metrics)


# ---- the saved router -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Router:
    """A trained advantage router: P(large better | decision-time features).

    projection: (hidden_size, projection_dim); mean, std, coef: (spec.size,).
    models: [{"name", "fingerprint"}] of the small and the large model it was trained on.
    """

    spec: FeatureSpec
    projection: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    bias: float
    models: tuple[dict, ...]
    scorer: str
    tau: float
    metrics: RouterMetrics | None = field(default=None)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from
    reader: ReaderSessions | None = field(default=None, compare=False)  # attached by load_router

    def __repr__(self) -> str:
        # Short and stable (run files record gates by repr): models, scorer, tau, weights digest.
        digest = hashlib.sha256(np.concatenate([self.coef, [self.bias]]).tobytes()).hexdigest()[:12]
        return (f"Router(models={[m['name'] for m in self.models]}, scorer={self.scorer!r}, "
                f"tau={self.tau:g}, features={self.spec.size}, weights={digest})")

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(large better) per row of features, shape (n, spec.size) -> (n,)."""
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.coef + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def advantage_probability(self, state: GateState) -> float:
        """P(large better) for the draft a gate is judging (what `AdvantageGate` scores)."""
        x = decision_features(self.spec, self.projection, self.reader, state)
        return float(self.probability(x[None, :])[0])

    def check_models(self, models: Sequence[Backend | ModelInfo]) -> None:
        """Refuse (RouterFileError) unless `models` are the small and large models (names and
        fingerprints) this router was trained for."""
        check_router_models(self.models, models)

    def save(self, path: str | Path) -> Path:
        import torch

        return save_router_file(path, ROUTER_FORMAT, self, spec=json.dumps(self.spec.to_json()),
                                projection=torch.from_numpy(np.ascontiguousarray(self.projection)),
                                mean=torch.from_numpy(self.mean), std=torch.from_numpy(self.std),
                                coef=torch.from_numpy(self.coef), bias=self.bias)

    @classmethod
    def from_payload(cls, payload: dict, path: Path) -> Router:
        """Build from a loaded file's payload (`load_router` reads the file)."""
        try:
            router = cls(spec=FeatureSpec.from_json(json.loads(payload["spec"])),
                         projection=payload["projection"].numpy().astype(np.float64),
                         mean=payload["mean"].numpy(), std=payload["std"].numpy(),
                         coef=payload["coef"].numpy(),
                         bias=float(payload["bias"]), **router_file_fields(payload))
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as error:
            raise RouterFileError(f"{path}: a damaged router file: {error}".split("\n")[0]) from error
        if router.coef.shape != (router.spec.size,):
            raise RouterFileError(f"{path}: {router.coef.shape[0]} weights for {router.spec.size} features")
        return router

    def summary(self) -> str:
        lines = [f"router for {' -> '.join(x['name'] for x in self.models)}, scorer {self.scorer}, "
                 f"tau {self.tau:g}, {self.spec.size} features"]
        return "\n".join(lines + ([self.metrics.line()] if self.metrics else []))


def save_router_file(path: str | Path, file_format: str, router, **fields) -> Path:
    """Write a router file: what every router records (format, the models it was trained
    for, scorer, tau, metrics) plus its own `fields` (tensors and strings only, so that
    loading needs no pickled code)."""
    import torch

    path = Path(path)
    payload = {"format": file_format, "models": json.dumps(list(router.models)), "scorer": router.scorer,
               "tau": router.tau, "metrics": json.dumps(router.metrics.to_json() if router.metrics else None),
               **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def router_file_fields(payload: dict) -> dict:
    """What every router file records, as constructor arguments (models, scorer, tau, metrics)."""
    metrics = json.loads(payload["metrics"])
    return {"models": tuple(json.loads(payload["models"])), "scorer": str(payload["scorer"]),
            "tau": float(payload["tau"]), "metrics": RouterMetrics(**metrics) if metrics else None}


def check_router_models(trained_for: Sequence[dict], models: Sequence[Backend | ModelInfo]) -> None:
    """Refuse (RouterFileError) unless `models` are the models (names and fingerprints) a
    router was trained for, in order (small, large)."""
    given = [_model_record(m.info if hasattr(m, "info") else m) for m in models]
    # files before entropies were recorded: HF's
    trained = [{"entropy": "exact", **dict(m)} for m in trained_for]
    identity = [[(m["name"], m["fingerprint"]) for m in x] for x in (given, trained)]
    if identity[0] != identity[1]:
        raise RouterFileError(f"this router was trained for {[m['name'] for m in trained]} "
                              f"(fingerprints {[m['fingerprint'] for m in trained]}), not {given}; "
                              "train one for these models (cascade train-router)")
    if given and given[0]["entropy"] != trained[0]["entropy"]:  # the router reads the drafting model's
        raise RouterFileError(f"this router read draft entropies computed '{trained[0]['entropy']}', but "
                              f"{given[0]['name']}'s backend gives '{given[0]['entropy']}': "
                              "ask that backend for "
                              "top_logprobs covering the vocabulary, or collect and train on it")


def _reader_backend(record: dict, given: Backend | None) -> Backend:
    """The router's reader: `given`, or loaded by the name it was trained with; its weights
    must be the ones it was trained with."""
    if given is None:
        given = load_model(ModelSpec(record["name"]))
    if given.info.fingerprint != record["fingerprint"]:
        raise RouterFileError(f"the router's reader {record['name']} has other weights now "
                              f"({given.info.fingerprint}, trained with {record['fingerprint']})")
    return given


# Router file formats -> the loader of their payload (payload, path) -> router. Each router
# kind registers its own (cascade.sequence_router registers its format when imported, which
# `import cascade` does), so this module needs no import of the kinds built on it.
ROUTER_LOADERS: dict[str, Callable[[dict, Path], object]] = {ROUTER_FORMAT: Router.from_payload}


def register_router_format(format_name: str, loader: Callable[[dict, Path], object]) -> None:
    """Let `load_router` read files of `format_name` with `loader(payload, path)`."""
    ROUTER_LOADERS[format_name] = loader


def load_router(path: str | Path, models: Sequence[Backend | ModelInfo] | None = None,
                reader: Backend | None = None):
    """Load a router saved by `Router.save` or `SequenceRouter.save` (the file says which);
    with `models` (small, large), refuse a router trained for other models. A router that
    reads a reader model gets `reader`, or the model loaded by the name it recorded."""
    import torch

    path = Path(path)
    if not path.exists():
        raise RouterFileError(f"no router file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one clear error
        raise RouterFileError(f"{path} is not a router file: {error}".split("\n")[0]) from error
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind not in ROUTER_LOADERS:
        raise RouterFileError(f"{path} is not a router file (format {' or '.join(ROUTER_LOADERS)})")
    router = ROUTER_LOADERS[kind](payload, path)
    # Where it came from (so a calibration file can name it), and its reader if it has one.
    spec = router.spec if isinstance(router, Router) else router.features
    router = dataclasses.replace(router, source=str(path.resolve()), reader=None if spec.reader is None
                                 else ReaderSessions(_reader_backend(spec.reader, reader)))
    if models is not None:
        router.check_models(models)
    return router
