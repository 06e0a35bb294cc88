"""Held-out metrics of the toolkit's own MoE: language modelling and routing.

One evaluation pass (``evaluate_model``) gives everything the training log and the seed-002
grid report: next-token loss, top-1 and top-3 accuracy, per-layer routing entropy, per-layer
expert utilization and its standard deviation, dropped assignments, and ``routing_acc``.

``routing_acc`` — how much the routing knows about the domain of the text: the held-out
accuracy of a nearest-centroid classifier that predicts a token's domain (general, math,
code, stories) from the experts it was routed to, i.e. the binary ``[L * E]`` indicator of its
selected experts over all MoE layers. The evaluation tokens are split by document (tokens of
even document ids give each domain's centroid, tokens of odd ids are classified) so that no
document is on both sides.
``routing_acc_chance`` is the majority-domain share of the test half, the score of a router
that knows nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from core.study_moe.layer import StudyMoeTopKRouter, routing_entropy


@contextmanager
def record_router_outputs(model: torch.nn.Module) -> Iterator[list[tuple]]:
    """Collect ``(logits, top_k_weights, top_k_index)`` of every router call, in layer order."""
    records: list[tuple] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: records.append(tuple(t.detach() for t in out)))
        for m in model.modules()
        if isinstance(m, StudyMoeTopKRouter)
    ]
    if not hooks:
        raise ValueError("this model has no StudyMoeTopKRouter to record")
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()


def utilization(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of the top-k selections ``[N, k]`` that each expert received, ``[E]`` summing to 1."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1.0)


def routing_accuracy(selected: torch.Tensor, domain_ids: torch.Tensor, doc_ids: torch.Tensor) -> tuple[float, float]:
    """``(routing_acc, chance)``: held-out domain accuracy of a nearest-centroid classifier.

    ``selected`` is the ``[N, L*E]`` expert indicator of each token. Centroids of each domain are
    fitted on tokens of even document ids and scored on tokens of odd ones. Returns
    ``(nan, nan)`` when a half is empty or the fitting half has fewer than two domains.
    """
    if not (selected.shape[0] == domain_ids.shape[0] == doc_ids.shape[0]):
        raise ValueError("selected, domain_ids and doc_ids must have one row per token")
    x = selected.float()
    train = doc_ids % 2 == 0
    test = ~train
    classes = domain_ids[train].unique()
    if int(train.sum()) == 0 or int(test.sum()) == 0 or len(classes) < 2:
        return float("nan"), float("nan")
    centroids = torch.stack([x[train & (domain_ids == c)].mean(0) for c in classes])
    predicted = classes[torch.cdist(x[test], centroids).argmin(dim=1)]
    acc = float((predicted == domain_ids[test]).float().mean())
    chance = float(torch.bincount(domain_ids[test]).max() / int(test.sum()))
    return acc, chance


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of an add-one unigram model fitted on ``train_ids``, scored on ``eval_ids``.

    The baseline the LM must clearly beat: it knows token frequencies but no context.
    """
    counts = torch.bincount(train_ids.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids.reshape(-1)].mean())


def unigram_by_domain(train_ids: torch.Tensor, dataset, vocab_size: int) -> dict[str, float]:
    """The add-one unigram baseline on each domain's next-token targets of ``dataset`` (a ``TokenizedDataset``)."""
    target_mask = (dataset.attention_mask[:, 1:] * dataset.attention_mask[:, :-1]).bool()
    targets, domains = dataset.input_ids[:, 1:][target_mask], dataset.domain_ids[:, 1:][target_mask]
    return {name: unigram_cross_entropy(train_ids, targets[domains == i], vocab_size)
            for i, name in enumerate(dataset.domain_names) if bool((domains == i).any())}


def _routing_summary(layer_logits: list[list[torch.Tensor]], layer_index: list[list[torch.Tensor]],
                     domains: torch.Tensor, docs: torch.Tensor, num_experts: int) -> dict:
    """Per-layer routing entropy and utilization, and ``routing_acc``, from each batch's per-layer logits and choices."""
    num_layers = len(layer_logits[0])
    logits_per_layer = [torch.cat([b[i] for b in layer_logits]) for i in range(num_layers)]
    index_per_layer = [torch.cat([b[i] for b in layer_index]) for i in range(num_layers)]
    layer_entropy = [float(routing_entropy(lg).mean()) for lg in logits_per_layer]
    layer_util = [utilization(ix, num_experts) for ix in index_per_layer]
    indicators = torch.cat([F.one_hot(ix, num_experts).sum(1).clamp(max=1) for ix in index_per_layer], dim=1)
    r_acc, chance = routing_accuracy(indicators, domains, docs)
    return {
        "entropy": sum(layer_entropy) / len(layer_entropy),
        "layer_entropy": layer_entropy,
        "utilization": torch.stack(layer_util).mean(0).tolist(),
        "layer_utilization": [u.tolist() for u in layer_util],
        "layer_utilization_std": [float(u.std(unbiased=False)) for u in layer_util],
        "routing_acc": r_acc,
        "routing_acc_chance": chance,
    }


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 16, max_rows: int | None = None) -> dict:
    """Loss, accuracies and routing statistics of ``model`` on a ``TokenizedDataset``.

    Next-token metrics are over every non-padding target token; routing metrics over every
    non-padding input token. Per-layer lists are in model layer order.
    """
    was_training = model.training
    model.eval()
    num_experts = model.config.num_experts
    rows = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    if rows == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    loss_sum, correct1, correct3, n_targets, dropped, assignments = 0.0, 0, 0, 0, 0, 0
    domain_sum = torch.zeros(len(dataset.domain_names), dtype=torch.float64)
    domain_count = torch.zeros(len(dataset.domain_names), dtype=torch.float64)
    layer_logits, layer_index, domains, docs = [], [], [], []
    for start in range(0, rows, batch_size):
        sl = slice(start, min(start + batch_size, rows))
        ids, mask = dataset.input_ids[sl], dataset.attention_mask[sl]
        with record_router_outputs(model) as records:
            logits = model(input_ids=ids, attention_mask=mask).logits
        target_mask = (mask[:, 1:] * mask[:, :-1]).bool()
        lg, tgt = logits[:, :-1][target_mask], ids[:, 1:][target_mask]
        token_loss = F.cross_entropy(lg.float(), tgt, reduction="none").double()
        loss_sum += float(token_loss.sum())
        target_domain = dataset.domain_ids[sl][:, 1:][target_mask]  # a target's domain is its document's
        domain_sum.index_add_(0, target_domain, token_loss)
        domain_count.index_add_(0, target_domain, torch.ones_like(token_loss))
        top3 = lg.topk(3, dim=-1).indices
        correct1 += int((top3[:, 0] == tgt).sum())
        correct3 += int((top3 == tgt[:, None]).any(-1).sum())
        n_targets += int(tgt.numel())
        flat = mask.reshape(-1).bool()
        layer_logits.append([r[0][flat] for r in records])
        layer_index.append([r[2][flat] for r in records])
        dropped += sum(int((r[1][flat] == 0).sum()) for r in records)
        assignments += sum(int(r[2][flat].numel()) for r in records)
        domains.append(dataset.domain_ids[sl][mask.bool()])
        docs.append(dataset.doc_ids[sl][mask.bool()])
    model.train(was_training)

    loss = loss_sum / max(n_targets, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct1 / max(n_targets, 1),
        "top3_accuracy": correct3 / max(n_targets, 1),
        **_routing_summary(layer_logits, layer_index, torch.cat(domains), torch.cat(docs), num_experts),
        "dropped_fraction": dropped / max(assignments, 1),
        "tokens": n_targets,
        "domain_loss": {name: float(domain_sum[i] / domain_count[i])
                        for i, name in enumerate(dataset.domain_names) if domain_count[i] > 0},
    }


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str = "Once upon a time", max_new_tokens: int = 60, seed: int = 0) -> str:
    """A sampled continuation (temperature 0.8, top-k 40), seeded so reruns agree."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
