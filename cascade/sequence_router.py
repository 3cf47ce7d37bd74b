"""A router that reads the draft token by token (a small bidirectional GRU).

The logistic `Router` sees a draft through a handful of summaries (mean and min logprob,
entropy, length, a projection of the last hidden state). Most of the small model's bad
steps on a multi-step task are one wrong token (an operand, a carried digit), and where
in the step that token sits, and what token it is, matters: an unsure digit in an
operand means something else than an unsure first token. `SequenceRouter` reads, per
draft token, an embedding of its id, its logprob, the entropy it was drawn from and its
position, runs a bidirectional GRU over them, max-pools, and joins the pooled vector with
the logistic router's standardised features in a one-hidden-layer head.

On the embedded pair's train split (runs/router_probe/README.md) a model of this shape
caught 98.5 % of bad steps escalating 0.453 of steps, where min_prob needed 0.565 and an
oracle 0.219.

It implements `cascade.gates.AdvantageModel` like `Router`, is trained on the same
`RouterDataset` (which must hold the drafts' tokens: `collect_router_data` records them)
with the same held-out split (`heldout_split`), and is saved with the same model
fingerprints; `cascade.router.load_router` loads either kind. Decision time costs one GRU
pass over the draft's tokens (tens of them) on the CPU, well under a millisecond.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cascade.errors import ConfigError
from cascade.gates import GateState
from cascade.router import (
    FeatureSpec,
    ReaderSessions,
    RouterDataset,
    RouterFileError,
    RouterMetrics,
    check_router_models,
    decision_features,
    heldout_metrics,
    heldout_split,
    register_router_format,
    router_file_fields,
    save_router_file,
)
from decoding import Backend, ModelInfo

__all__ = ["SequenceSpec", "SequenceRouter", "train_sequence_router", "SEQUENCE_ROUTER_FORMAT"]

SEQUENCE_ROUTER_FORMAT = "stepcascade-sequence-router-v1"
# Per-token inputs besides the id embedding: logprob, entropy, position / _POSITION_SCALE
# (a step is tens of tokens: positions stay of the order of the other inputs).
_TOKEN_NUMERIC = 3
_POSITION_SCALE = 16.0


@dataclass(frozen=True)
class SequenceSpec:
    """The shape of a sequence router.

    id_buckets: token ids index an embedding table of this many rows (id modulo
        id_buckets: a real model's vocabulary shares rows; the embedded pair's fits).
    embedding_dim: size of a token id's embedding.
    width: the GRU's hidden size (per direction) and the head's hidden layer.
    logprob_floor: per-token logprobs are clamped to >= this: below it a token is "very
        unsure" either way, and an unclamped -1e9 (a backend's missing top-k entry) would
        swamp every activation.
    """

    id_buckets: int = 4096
    embedding_dim: int = 16
    width: int = 64
    logprob_floor: float = -20.0

    def __post_init__(self) -> None:
        for name in ("id_buckets", "embedding_dim", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.logprob_floor, (int, float)) or not self.logprob_floor < 0:
            raise ConfigError(f"logprob_floor must be a negative number, got {self.logprob_floor!r}")

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> SequenceSpec:
        return cls(int(data["id_buckets"]), int(data["embedding_dim"]), int(data["width"]),
                   float(data["logprob_floor"]))


def _network(spec: SequenceSpec, n_scalars: int, seed: int = 0):
    """The torch module, its weights initialised from `seed` without touching torch's
    global random state (built here so that importing this module does not import torch)."""
    import torch

    class SequenceNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(spec.id_buckets, spec.embedding_dim)
            self.token_input = torch.nn.Linear(spec.embedding_dim + _TOKEN_NUMERIC, spec.width)
            self.gru = torch.nn.GRU(spec.width, spec.width, batch_first=True, bidirectional=True)
            self.head = torch.nn.Sequential(torch.nn.Linear(2 * spec.width + n_scalars, spec.width),
                                            torch.nn.ReLU(), torch.nn.Linear(spec.width, 1))

        def forward(self, ids, numeric, lengths, scalars):
            """ids (b, t) long, numeric (b, t, 3), lengths (b,) >= 1, scalars (b, n_scalars)
            -> logits (b,)."""
            x = torch.relu(self.token_input(torch.cat([self.embedding(ids), numeric], dim=-1)))
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                             enforce_sorted=False)
            y, _ = self.gru(packed)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=ids.shape[1])
            # Max-pool over real tokens only: padding is pushed far below any activation.
            padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
            pooled = y.masked_fill(padding[..., None], -1e4).max(dim=1).values
            return self.head(torch.cat([torch.relu(pooled), scalars], dim=-1)).squeeze(-1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SequenceNet()


def _batch(spec: SequenceSpec, sequences: Sequence[tuple[Sequence[int], Sequence[float], Sequence[float]]]):
    """Pad draft token sequences into tensors. An empty draft is read as one neutral token
    (id 0, logprob 0, entropy 0) so every row has a length >= 1."""
    import torch

    lengths = [max(1, len(ids)) for ids, _, _ in sequences]
    longest = max(lengths)
    ids_tensor = torch.zeros(len(sequences), longest, dtype=torch.long)
    numeric = torch.zeros(len(sequences), longest, _TOKEN_NUMERIC)
    for row, (ids, logprobs, entropies) in enumerate(sequences):
        n = len(ids)
        if n == 0:
            continue
        ids_tensor[row, :n] = torch.as_tensor(np.asarray(ids, dtype=np.int64) % spec.id_buckets)
        numeric[row, :n, 0] = torch.as_tensor(np.maximum(np.asarray(logprobs, dtype=np.float32),
                                                         spec.logprob_floor))
        numeric[row, :n, 1] = torch.as_tensor(np.asarray(entropies, dtype=np.float32))
        numeric[row, :n, 2] = torch.arange(n, dtype=torch.float32) / _POSITION_SCALE
    return ids_tensor, numeric, torch.tensor(lengths, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class SequenceRouter:
    """A trained sequence router: P(large better | the draft's tokens, the scalar features).

    features: the logistic router's feature spec (its projection is drawn from it), with
    the training mean/std that standardise those features. state: the network's weights
    (name -> numpy array). models: [{"name", "fingerprint"}] of the small and the large
    model it was trained for.
    """

    spec: SequenceSpec
    features: FeatureSpec
    mean: np.ndarray
    std: np.ndarray
    state: dict
    models: tuple[dict, ...]
    scorer: str
    tau: float
    metrics: RouterMetrics | None = field(default=None)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from
    reader: ReaderSessions | None = field(default=None, compare=False, repr=False)  # attached by load_router
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        # Short and stable (run files record gates by repr): models, scorer, tau, weights digest.
        digest = hashlib.sha256()
        for name in sorted(self.state):
            digest.update(np.ascontiguousarray(self.state[name]).tobytes())
        return (f"SequenceRouter(models={[m['name'] for m in self.models]}, scorer={self.scorer!r}, "
                f"tau={self.tau:g}, width={self.spec.width}, weights={digest.hexdigest()[:12]})")

    def _net(self):
        """The torch module, built once per router (lazily: loading stays cheap)."""
        if "net" not in self._cache:
            import torch

            net = _network(self.spec, self.features.size)
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state.items()})
            net.eval()
            self._cache["net"] = net
            self._cache["projection"] = self.features.projection()
        return self._cache["net"]

    def probability(self, sequences: Sequence[tuple[Sequence[int], Sequence[float], Sequence[float]]],
                    features: np.ndarray) -> np.ndarray:
        """P(large better) per draft: sequences[i] = (token_ids, logprobs, entropies),
        features (n, features.size) the scalar features (unstandardised) -> (n,)."""
        import torch

        net = self._net()
        scalars = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        out = []
        with torch.no_grad():
            for start in range(0, len(sequences), 512):
                ids, numeric, lengths = _batch(self.spec, sequences[start:start + 512])
                logits = net(ids, numeric, lengths,
                             torch.as_tensor(scalars[start:start + 512], dtype=torch.float32))
                out.append(torch.sigmoid(logits).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def advantage_probability(self, state: GateState) -> float:
        """P(large better) for the draft a gate is judging (what `AdvantageGate` scores)."""
        self._net()
        x = decision_features(self.features, self._cache["projection"], self.reader, state)
        output = state.output
        return float(self.probability([(output.token_ids, output.logprobs, output.entropies)], x[None, :])[0])

    def check_models(self, models: Sequence[Backend | ModelInfo]) -> None:
        """Refuse (RouterFileError) unless `models` are the small and large models this
        router was trained for."""
        check_router_models(self.models, models)

    def save(self, path: str | Path) -> Path:
        import torch

        return save_router_file(
            path, SEQUENCE_ROUTER_FORMAT, self, spec=json.dumps(self.spec.to_json()),
            features=json.dumps(self.features.to_json()), mean=torch.from_numpy(self.mean),
            std=torch.from_numpy(self.std),
            state={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.state.items()})

    @classmethod
    def from_payload(cls, payload: dict, path: Path) -> SequenceRouter:
        """Build from a loaded file's payload (`cascade.router.load_router` reads the file)."""
        try:
            router = cls(spec=SequenceSpec.from_json(json.loads(payload["spec"])),
                         features=FeatureSpec.from_json(json.loads(payload["features"])),
                         mean=payload["mean"].numpy(), std=payload["std"].numpy(),
                         state={k: v.numpy() for k, v in payload["state"].items()},
                         **router_file_fields(payload))
            router._net()  # weights of the wrong shape fail here, not at the first request
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as error:
            raise RouterFileError(
                f"{path}: a damaged sequence-router file: {error}".split("\n")[0]) from error
        return router

    def summary(self) -> str:
        lines = [f"sequence router (bi-GRU width {self.spec.width}) for "
                 f"{' -> '.join(x['name'] for x in self.models)}, scorer {self.scorer}, tau {self.tau:g}, "
                 f"{self.features.size} scalar features"]
        return "\n".join(lines + ([self.metrics.line()] if self.metrics else []))


def train_sequence_router(data: RouterDataset, *, tau: float = 0.0, holdout: float = 0.2, seed: int = 0,
                          spec: SequenceSpec = SequenceSpec(), epochs: int = 8, batch_size: int = 128,
                          learning_rate: float = 3e-3, weight_decay: float = 0.01) -> SequenceRouter:
    """Train a sequence router on `data` (which must hold the drafts' tokens), with the
    same held-out split as `train_router` (same `holdout` and `seed`: same steps held out).

    Class balance: the positive class's loss is weighted by negatives / positives. AdamW,
    `epochs` passes in an order drawn from `seed`; the weights are initialised from `seed`
    too, without touching torch's global random state. Deterministic for a given seed and
    thread count.
    """
    import torch

    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not data.has_tokens:
        raise RouterFileError("the sequence router reads the drafts' tokens, but this router data holds none "
                              "(collected before tokens were recorded); collect it again")
    labels, held = heldout_split(data, tau=tau, holdout=holdout, seed=seed)
    train_rows = np.flatnonzero(~held)
    mean = data.features[train_rows].mean(axis=0)
    std = data.features[train_rows].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    scalars = (data.features - mean) / std
    sequences = [data.step_tokens(i) for i in range(len(data))]
    positive_rate = float(labels[train_rows].mean())
    rng = np.random.default_rng(seed)
    net = _network(spec, data.spec.size, seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    positive_weight = torch.tensor((1.0 - positive_rate) / positive_rate)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    scalar_tensor = torch.as_tensor(scalars, dtype=torch.float32)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(train_rows)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, numeric, lengths = _batch(spec, [sequences[i] for i in rows])
            logits = net(ids, numeric, lengths, scalar_tensor[rows])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[rows],
                                                                        pos_weight=positive_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    router = SequenceRouter(spec=spec, features=data.spec, mean=mean, std=std, state=state,
                            models=data.models,
                            scorer=data.scorer, tau=float(tau))
    held_rows = np.flatnonzero(held)
    probability = router.probability([sequences[i] for i in held_rows], data.features[held_rows])
    if not np.isfinite(probability).all():
        raise ConfigError("sequence router training diverged (non-finite probabilities); lower learning_rate")
    metrics = heldout_metrics(data, labels, held, probability)
    return SequenceRouter(spec=spec, features=data.spec, mean=mean, std=std, state=state, models=data.models,
                          scorer=data.scorer, tau=float(tau), metrics=metrics)


register_router_format(SEQUENCE_ROUTER_FORMAT, SequenceRouter.from_payload)
