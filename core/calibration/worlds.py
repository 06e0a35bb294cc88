"""Simulated routing worlds with a known truth: nulls that look like real text, and planted effects.

Every token's routing is drawn as in a softmax router: each (layer, expert) gets a logit, and the
top-k experts are a draw without replacement proportional to exp(logit) (Gumbel top-k), so the
shares of a world are those of a router, not of an urn. What real text brings is in the logits:
per-document offsets (documents differ), topics that shift routing and choose the vocabulary
(vocabulary follows topic), runs of tokens that keep their experts (stickiness). Planted effects
are small changes to that draw whose size is stated as what it does to a share (1.3x, 2x, 3x),
solved once per shape (:func:`boost_for`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from core.routing_data import RoutingData


@dataclass(frozen=True)
class Shape:
    """The size of a world: the issue's default is OLMoE's routing (16 x 64, top-8) on 40 documents x 250 tokens."""

    layers: int = 16
    experts: int = 64
    top_k: int = 8
    docs: int = 40
    doc_len: int = 250
    domains: int = 2
    vocab: int = 2000


@dataclass(frozen=True)
class World:
    """One simulated world: what makes it look like text, and at most one planted effect with its target.

    ``target``: (decision key, element) the planted effect should be flagged at; None for a null world.
    Sizes of planted effects are what they do to a share (``domain_factor`` 1.3 = the expert takes
    1.3x its share in domain 0) or a probability (``stickiness``, ``copy_rate``, ``couple_rate``).
    """

    name: str
    about: str
    doc_sd: float = 0.0  # per-document logit offsets (sd): documents differ
    topics: int = 0  # topical documents: each topic shifts routing (sd ``topic_sd``) and has its own vocabulary
    topic_sd: float = 0.5
    docs: int | None = None  # overrides the shape's number of documents (few-document worlds)
    doc_len: int | None = None
    stickiness: float = 0.0  # chance a token keeps the previous token's experts, every layer
    domain_factor: float = 1.0  # expert (layer 1, expert 0) in domain 0
    token_factor: float = 1.0  # the most frequent token id toward expert 0, every layer
    dominant_factor: float = 1.0  # expert (layer 2, expert 0) for every token
    dead: bool = False  # expert (layer 3, expert 1) never chosen
    copy_rate: float = 0.0  # layer 4 copies layer 3's choice for this share of tokens
    couple_rate: float = 0.0  # expert 0 at layer 5 brings expert 0 at layer 9 for this share of its tokens
    saturation: float = 0.0  # the early checkpoint already has the final experts for this share of tokens
    datasets: int = 1  # documents dealt in turn to this many datasets (routing alike in all: a null for |Δr|)
    team_rate: float = 0.0  # this share of tokens takes experts 0 and 1 together at layer 6 (a within-layer team)
    dataset_copy_rate: float = 0.0  # in the second dataset only, layer 4 copies layer 3 for this share of tokens
    target: tuple[str, object] | None = None

    @property
    def null(self) -> bool:
        return self.target is None

    def shape(self, base: Shape) -> Shape:
        return replace(base, docs=self.docs or base.docs, doc_len=self.doc_len or base.doc_len)


def _topk(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[..., k]`` experts drawn without replacement with probability proportional to exp(logits) (Gumbel top-k)."""
    g = logits + rng.gumbel(size=logits.shape)
    idx = np.argpartition(-g, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(g, idx, -1), axis=-1)  # best first: the top-1 is column 0
    return np.take_along_axis(idx, order, -1)


@lru_cache(maxsize=64)
def boost_for(factor: float, experts: int, top_k: int, draws: int = 400_000) -> float:
    """The logit added to one expert that multiplies its chance of being in the top-k by ``factor`` (solved by bisection)."""
    if factor == 1.0:
        return 0.0
    g = np.random.default_rng(12345).gumbel(size=(draws, experts))
    kth = experts - 1 - top_k
    base = np.partition(g[:, 1:], kth, axis=1)[:, kth]  # the k-th best of the others: expert 0 is in if it beats this
    p0 = np.mean(g[:, 0] > base)
    # expert 0 with a boost b is in where base - g0 < b: the share is the empirical CDF of base - g0 at b, so the
    # boost is its quantile at factor * p0 (the limit of a bisection on b; within [-10, 10] as that bisection was)
    m = int(np.searchsorted(np.arange(1, draws + 1) / draws, factor * p0))  # the fewest tokens in that reach the share
    if m >= draws:
        return 10.0
    gap = base - g[:, 0]
    return float(np.clip(np.partition(gap, m)[m], -10.0, 10.0))


def _labels(world: World, shape: Shape, rng: np.random.Generator, fixed: np.random.Generator) -> dict[str, np.ndarray]:
    """Per token: document, position, domain (independent of topic), topic, token id (from the topic's vocabulary)."""
    D, T = shape.docs, shape.doc_len
    doc = np.repeat(np.arange(D), T)
    topic = (rng.permutation(D) % max(world.topics, 1))[doc]
    ranks = np.arange(1, shape.vocab + 1)
    zipf = 1.0 / ranks
    zipf /= zipf.sum()
    rank = rng.choice(shape.vocab, size=D * T, p=zipf)
    if world.topics:  # each topic orders the vocabulary its own way (the 20 most frequent ids are shared)
        perms = np.stack([np.r_[np.arange(20), 20 + fixed.permutation(shape.vocab - 20)] for _ in range(world.topics)])
        tok = perms[topic, rank]
    else:
        tok = rank
    return {"doc": doc, "pos": np.tile(np.arange(T), D), "domain": doc % shape.domains, "topic": topic, "tok": tok}


def _logits(world: World, shape: Shape, lab: dict[str, np.ndarray], rng: np.random.Generator,
            fixed: np.random.Generator) -> np.ndarray:
    """``[N, L, E]`` logits: document offsets, topic offsets and the planted preferences."""
    L, E, k = shape.layers, shape.experts, shape.top_k
    n = len(lab["doc"])
    x = np.zeros((n, L, E))
    if world.doc_sd:
        x += rng.normal(0, world.doc_sd, (shape.docs, L, E))[lab["doc"]]
    if world.topics:
        x += topic_offsets(world.topics, L, E, world.topic_sd, fixed)[lab["topic"]]
    if world.domain_factor != 1.0:
        x[lab["domain"] == 0, 1, 0] += boost_for(world.domain_factor, E, k)
    if world.token_factor != 1.0:
        x[lab["tok"] == 0, :, 0] += boost_for(world.token_factor, E, k)
    if world.dominant_factor != 1.0:
        x[:, 2, 0] += boost_for(world.dominant_factor, E, k)
    if world.dead:
        x[:, 3, 1] = -np.inf
    return x


def topic_offsets(topics: int, L: int, E: int, sd: float, rng: np.random.Generator) -> np.ndarray:
    """``[topics, L, E]`` logit offsets whose topics differ but whose overall load is balanced when topics are equally common.

    Each layer draws ``topics`` values; topic t gives expert e the value ``(e - t) mod topics``
    (experts shuffled once per layer), so over the topics every expert gets every value once.
    Offsets drawn independently per topic would make the load of this one world truly uneven (8
    topics are a small sample), and then a load-balance verdict would be right to flag it.
    """
    u = rng.normal(0, sd, (L, topics))
    e = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E]: expert order per layer
    t = np.arange(topics)[:, None, None]
    return np.take_along_axis(np.broadcast_to(u, (topics, L, topics)), (e[None] - t) % topics, -1)


def _stick(idx: np.ndarray, lab: dict[str, np.ndarray], rate: float, rng: np.random.Generator) -> None:
    """In place: with chance ``rate`` a token keeps the previous token's experts at every layer (same document)."""
    keep = np.nonzero((rng.random(len(idx)) < rate) & (lab["pos"] > 0))[0]
    for i in keep:  # in order, so a run of kept tokens carries one choice along
        idx[i] = idx[i - 1]


def _copy_layer(idx: np.ndarray, rate: float, rng: np.random.Generator, src: int = 3, dst: int = 4) -> None:
    """In place: layer ``dst`` takes layer ``src``'s experts for a share ``rate`` of tokens."""
    pick = rng.random(len(idx)) < rate
    idx[pick, dst] = idx[pick, src]


def _couple(idx: np.ndarray, rate: float, rng: np.random.Generator, a: tuple[int, int] = (5, 0),
            b: tuple[int, int] = (9, 0)) -> None:
    """In place: tokens with expert a[1] at layer a[0] take expert b[1] at layer b[0] (in place of their k-th) with chance ``rate``."""
    has = (idx[:, a[0]] == a[1]).any(-1) & ~(idx[:, b[0]] == b[1]).any(-1) & (rng.random(len(idx)) < rate)
    idx[has, b[0], -1] = b[1]


def _team(idx: np.ndarray, rate: float, rng: np.random.Generator, layer: int = 6, pair: tuple[int, int] = (0, 1)) -> None:
    """In place: a share ``rate`` of tokens take both experts of ``pair`` first at ``layer``, keeping k distinct experts."""
    k = idx.shape[-1]
    for t in np.nonzero(rng.random(len(idx)) < rate)[0]:
        rest = [e for e in idx[t, layer] if e not in pair]
        idx[t, layer] = list(pair) + rest[: k - 2]


def _fixed(world: World) -> np.random.Generator:
    """What the world is (its topics' routing and vocabularies): the same in every draw, as one model and one corpus are."""
    return np.random.default_rng(zlib.crc32(world.name.encode()))


def simulate(world: World, base: Shape, seed: int) -> RoutingData:
    """One draw of the world (its documents, their offsets and tokens; its topics are fixed): routing with labels."""
    return simulate_checkpoints(world, base, seed)[-1]


def simulate_checkpoints(world: World, base: Shape, seed: int) -> list[RoutingData]:
    """The same tokens at an early checkpoint and the final one.

    The early routing is a second draw from the same logits (documents route alike at both), so
    its overlap with the final experts is what a random token of the document gives, unless the
    world plants ``saturation``: that share of tokens already has its final experts.
    """
    shape = world.shape(base)
    rng = np.random.default_rng([seed, zlib.crc32(world.name.encode())])
    lab = _labels(world, shape, rng, _fixed(world))
    lab["dataset"] = lab["doc"] % world.datasets
    logits = _logits(world, shape, lab, rng, _fixed(world))
    out = []
    for c in range(2):
        idx = _topk(logits, shape.top_k, rng)
        if world.stickiness:
            _stick(idx, lab, world.stickiness, rng)
        if world.copy_rate:
            _copy_layer(idx, world.copy_rate, rng)
        if world.couple_rate:
            _couple(idx, world.couple_rate, rng)
        if world.team_rate:
            _team(idx, world.team_rate, rng)
        if world.dataset_copy_rate:
            second = np.nonzero(lab["dataset"] == 1)[0]
            sub = idx[second]
            _copy_layer(sub, world.dataset_copy_rate, rng)
            idx[second] = sub
        out.append(idx)
    if world.saturation:
        keep = rng.random(len(out[0])) < world.saturation
        out[0][keep] = out[1][keep]
    return [_routing(idx, lab, shape) for idx in out]


def _routing(idx: np.ndarray, lab: dict[str, np.ndarray], shape: Shape) -> RoutingData:
    ds = int(lab["dataset"].max(initial=0)) + 1
    return RoutingData(
        moe_layers=list(range(shape.layers)), num_experts=shape.experts, top_k=shape.top_k,
        topk_idx=torch.from_numpy(idx.astype(np.int64)), topk_weight=torch.full(idx.shape, 1.0 / shape.top_k),
        token_ids=torch.from_numpy(lab["tok"].astype(np.int64)), positions=torch.from_numpy(lab["pos"]),
        doc_ids=torch.from_numpy(lab["doc"]), domain_ids=torch.from_numpy(lab["domain"]),
        dataset_ids=torch.from_numpy(lab["dataset"].astype(np.int64)),
        domain_names=[f"domain{d}" for d in range(shape.domains)],
        dataset_names=["simulated"] if ds == 1 else [f"simulated{i}" for i in range(ds)],
        score_fn="softmax",
    )
