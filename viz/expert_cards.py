"""Expert cards in the page: compact data embedded once, each card drawn on demand when picked or clicked.

The page holds every card's numbers once, as compact JSON (shares in units of 1e-5, lifts in
hundredths, token ids with one label table), escaped like the coloured text's (``<``, ``>``, ``&``
never appear raw). A small script draws one card when the reader picks a layer and expert, opens
``#expert-L5-E17``, or clicks a cell of any figure whose hover names an expert (utilization,
co-activation, domain and vocabulary heatmaps, the Sankey's nodes): the figure's hover template
says which coordinate is the layer and which the expert, so no figure needs to know about cards.
Every string of the run goes into the page as text (``textContent``), never as markup. At wide
shapes (60 x 256) the data goes into ``data/expert_cards.js`` beside the page instead, loaded by a script tag,
so report.html keeps its size bound; past ``MAX_BYTES`` it is cut (fewer contexts, a narrower window, fewer tokens).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from viz._common import token_label
from viz.expert_cards_js import CSS, JS

MAX_BYTES = 16_000_000  # the cards' JSON at most (at 60 x 256 with full token lists, cut to fit)
EMBED_BYTES = 2_000_000  # embedded in the page up to this (OLMoE's 1,024 cards: ~0.5 MB); beyond, a file beside it
BESIDE_FILE = "expert_cards.js"
PARTNERS = 5
# (contexts, window, tokens, partners) tried in turn until the data fits MAX_BYTES
LEVELS = ((5, 8, 8, 5), (3, 6, 6, 4), (2, 5, 5, 3), (1, 4, 4, 3), (1, 3, 3, 2), (1, 2, 2, 1))


def _int(x: Any, scale: float) -> int | None:
    """``x * scale`` rounded, None where not a finite number."""
    x = float(x)
    return int(round(x * scale)) if np.isfinite(x) else None


def _scaled(a: Any, scale: float) -> list:
    return [_int(v, scale) for v in np.asarray(a, np.float64).ravel()]


def _shares(cards: Any) -> dict[str, Any]:
    """Shares (x 1e5) with their intervals: all tokens, then each dataset and domain, each flat over (layer, expert)."""
    groups = [("all", "", cards.share, cards.share_low, cards.share_high)]
    for kind, names, value, low, high in (
            ("dataset", cards.datasets, cards.share_dataset, cards.share_dataset_low, cards.share_dataset_high),
            ("domain", cards.domains, cards.share_domain, cards.share_domain_low, cards.share_domain_high)):
        value = np.asarray(value)
        for g in range(value.shape[0]):
            name = str(names[g]) if g < len(names) else str(g)
            groups.append((kind, name, value[g], np.asarray(low)[g], np.asarray(high)[g]))
    return {"groups": [[kind, name] for kind, name, *_ in groups],
            "v": [_scaled(v, 1e5) for *_, v, _, _ in groups], "lo": [_scaled(lo, 1e5) for *_, lo, _ in groups],
            "hi": [_scaled(hi, 1e5) for *_, hi in groups]}


def _tokens(cards: Any, n: int) -> list[list]:
    """Per card: [token id, count, occurrences, expected x 100, lift x 100, low x 100, high x 100] per top token."""
    ids = np.asarray(cards.top_tokens)[..., :n]
    fields = [np.asarray(getattr(cards, f))[..., :n] for f in ("top_count", "top_occurrences", "top_expected",
                                                                "top_lift", "top_lift_low", "top_lift_high")]
    L, E = ids.shape[:2]
    out = []
    for c in range(L * E):
        li, e = divmod(c, E)
        row = []
        for m in np.nonzero(ids[li, e] >= 0)[0]:
            row += [int(ids[li, e, m]), _int(fields[0][li, e, m], 1), _int(fields[1][li, e, m], 1)]
            row += [_int(f[li, e, m], 100) for f in fields[2:]]
        out.append(row)
    return out


def _contexts(cards: Any, n: int, window: int) -> list[list]:
    """Per card: [weight x 1000, dataset, domain, document, position, 2 window + 1 token ids] per context."""
    w = np.asarray(cards.ctx_weight)[..., :n]
    meta = np.asarray(cards.ctx_meta)[..., :n, :]
    full = np.asarray(cards.ctx_tokens).shape[-1] // 2
    toks = np.asarray(cards.ctx_tokens)[..., :n, full - window:full + window + 1]
    L, E = w.shape[:2]
    out = []
    for c in range(L * E):
        li, e = divmod(c, E)
        row = []
        for j in np.nonzero(np.isfinite(w[li, e]))[0]:
            row += [_int(w[li, e, j], 1000), *(int(v) for v in meta[li, e, j]), *(int(t) for t in toks[li, e, j])]
        out.append(row)
    return out


def _partners(co: Any, n: int, min_count: int) -> list[list] | None:
    """Per card: [expert, lift x 100, tokens together] of its ``n`` partners of largest lift (seen together min_count+ times)."""
    if co is None:
        return None
    lift, joint = np.asarray(co.lift, np.float64), np.asarray(co.joint, np.float64)
    L, E = lift.shape[:2]
    out = []
    for li in range(L):
        for i in range(E):
            score = np.where((joint[li, i] >= min_count) & (np.arange(E) != i) & np.isfinite(lift[li, i]), lift[li, i], -np.inf)
            best = [j for j in np.argsort(-score, kind="stable")[:n] if np.isfinite(score[j])]
            out.append([v for j in best for v in (int(j), _int(lift[li, i, j], 100), int(joint[li, i, j]))])
    return out


def _card_of(layers: list[int], E: int, layer: Any, expert: Any) -> int | None:
    """The card index of (model layer, expert), None where the layer is not a MoE layer of the cards."""
    layer, expert = int(layer), int(expert)
    return layers.index(layer) * E + expert if layer in layers and 0 <= expert < E else None


def _ablation(ab: Any, layers: list[int], E: int) -> dict[str, Any] | None:
    """The measured ablations, each listed under every expert it removed: loss change per domain (x 1e4) and interval."""
    if ab is None:
        return None
    est = getattr(ab, "estimate", None)
    low = np.asarray(est.low) if est is not None else np.full(np.shape(ab.delta), np.nan)
    high = np.asarray(est.high) if est is not None else np.full(np.shape(ab.delta), np.nan)
    rows = []
    for t, target in enumerate(ab.target_experts):
        removed = [(layer, e) for layer, experts in target.items() for e in experts]
        for layer, e in removed:
            card = _card_of(layers, E, layer, e)
            if card is not None:
                rows.append([card, str(ab.targets[t]), len(removed), _scaled(ab.delta[t], 1e4),
                             _scaled(low[t], 1e4), _scaled(high[t], 1e4)])
    return {"domains": [str(d) for d in ab.domains], "rows": rows}


def _pruning(pr: Any, layers: list[int], E: int) -> dict[str, Any] | None:
    """Every (criterion, fraction) that pruned the expert: overall loss change (x 1e4) and its interval."""
    if pr is None:
        return None
    rows = []
    for ci, crit in enumerate(pr.criteria):
        for fi, frac in enumerate(pr.fractions):
            by_layer = pr.removed.get(crit, {}).get(str(frac), pr.removed.get(crit, {}).get(frac, {}))
            for layer, experts in by_layer.items():
                for e in experts:
                    card = _card_of(layers, E, layer, e)
                    if card is not None:
                        rows.append([card, str(crit), float(frac), _int(pr.overall[ci][fi], 1e4),
                                     _int(pr.overall_low[ci][fi], 1e4), _int(pr.overall_high[ci][fi], 1e4)])
    return {"rows": rows}


def _checkpoints(dyn: Any, layers: list[int]) -> dict[str, Any] | None:
    """Each expert's share (x 1e5) at every checkpoint of the run, flat over (layer, expert) per checkpoint."""
    if dyn is None or [int(x) for x in dyn.moe_layers] != layers:
        return None
    return {"steps": [int(s) for s in dyn.steps], "v": [_scaled(u, 1e5) for u in np.asarray(dyn.utilization)]}


def _vocab(tokens: list[list], contexts: list[list], window: int,
           decode: Callable[[int], str] | None) -> dict[str, str]:
    """The label of every token id the cards show."""
    ids = {row[i] for row in tokens for i in range(0, len(row), 7)}
    width = 5 + 2 * window + 1
    ids |= {t for row in contexts for j in range(0, len(row), width) for t in row[j + 5:j + width] if t >= 0}
    return {str(t): token_label(decode(t) if decode else str(t)) for t in sorted(ids)}


def expert_cards_payload(cards: Any, decode: Callable[[int], str] | None = None, others: Mapping[str, Any] | None = None,
                         max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The page's data for every card: shares, top tokens, contexts, partners, ablation, pruning, checkpoints.

    ``cards``: a ``core.analysis.expert_cards.ExpertCards`` or anything with its fields (viz imports no
    analysis); ``others``: the run's ``coactivation``, ``ablation``, ``pruning`` and
    ``checkpoint_dynamics`` results where present. The first of ``LEVELS`` whose JSON fits ``max_bytes`` is used.
    """
    others = others or {}
    layers, E = [int(x) for x in cards.moe_layers], int(cards.num_experts)
    base = {"layers": layers, "E": E, "k": int(cards.top_k), "tokens_read": int(cards.num_tokens),
            "min_count": int(cards.min_count), "weights": bool(cards.weights_recorded),
            "dropped_below": int(cards.counts_dropped_below), "share": _shares(cards),
            "ablation": _ablation(others.get("ablation"), layers, E), "pruning": _pruning(others.get("pruning"), layers, E),
            "checkpoints": _checkpoints(others.get("checkpoint_dynamics"), layers)}
    full_window = int(cards.window)
    for level, (n_ctx, window, n_tok, n_par) in enumerate(LEVELS):
        window = min(window, full_window)
        tokens, contexts = _tokens(cards, n_tok), _contexts(cards, n_ctx, window)
        payload = dict(base, window=window, tok=tokens, ctx=contexts, level=level, cut=level > 0,
                       partners=_partners(others.get("coactivation"), n_par, int(cards.min_count)),
                       vocab=_vocab(tokens, contexts, window, decode))
        if len(script_json(payload)) <= max_bytes:
            break
    return payload


def script_json(payload: Mapping[str, Any]) -> str:
    """JSON safe inside a script element: no ``</script>``, comment or entity can start from the data."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def expert_cards_html(payload: Mapping[str, Any], element_id: str = "expert-cards",
                      embed_bytes: int = EMBED_BYTES) -> tuple[str, dict[str, str]]:
    """The cards' markup (picker, panel, data, script) and the files it loads from ``data/`` (none when embedded).

    Data up to ``embed_bytes`` is embedded in the page as escaped JSON; more (a wide model's) goes into
    ``data/expert_cards.js`` beside the page, loaded by a script tag (works from disk, offline), so the page stays light.
    """
    eid = html.escape(element_id, quote=True)
    blob = script_json(payload)
    embed = len(blob) <= embed_bytes
    files = {} if embed else {BESIDE_FILE: f"window.__expertCardsData = {blob};\n"}
    data = (f"<script type='application/json' class='ec-data'>{blob}</script>" if embed
            else f"<script src='data/{BESIDE_FILE}'></script>")
    return (f"<div class='expert-cards' id='{eid}'><div class='ec-picker'>"
            "<label>layer <select class='ec-layer'></select></label> "
            "<label>expert <input class='ec-expert' type='number' min='0' value='0' style='width:5em'></label> "
            "<button type='button' class='ec-open'>open card</button> <span class='ec-hint'></span></div>"
            "<aside class='ec-panel' role='dialog' aria-label='expert card' hidden>"
            "<button type='button' class='ec-close' aria-label='close'>×</button><div class='ec-body'></div></aside>"
            f"{data}</div><style>{CSS}</style><script>({JS})(document.getElementById({json.dumps(element_id)}));</script>",
            files)
