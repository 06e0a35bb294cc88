"""Benchmark routing collection against the model's plain forward pass, and the cache's size.

Collection (tracing every router with ``MoEModelWrapper`` and writing the cache) is timed
against the model's plain forward (its routers run anyway: the honest floor) on the very same
batches, in the same run. Each batch also goes through the forward with plain PyTorch hooks
on the routers (the least any recorder can cost). The three run back to back, in rotating
order, so that a shared machine slows them alike. The headline ratio sums, per batch, the
fastest of the repeats; the median ratio of the paired passes is printed beside it. Also printed:
the tracing overhead, the median over every batch of its trace time over the same batch's plain
forward and over its hooked forward (CPU time by default on the CPU: ``time.process_time``,
which others' load on a shared machine disturbs less than wall time).
Targets: >= 0.95 of the plain forward at OLMoE's real dimensions on CPU, >= 0.9 on a GPU in
bf16 at batch 16 x 512. Also prints bytes per token on disk for each storage mode.

    uv run python exp/benchmark_collection.py --threads 1                        # embedded model
    uv run python exp/benchmark_collection.py --model tiny-mixtral --threads 1 --rows 2 --batch-size 2 \
        --seq-len 64 --full-rows --repeats 30                                    # tracing overhead at 2 x 64 tokens
    uv run python exp/benchmark_collection.py --model olmoe-1b-7b --layers 2 --threads 2 --rows 8 --batch-size 4
    uv run python exp/benchmark_collection.py --model olmoe-1b-7b --layers 16 --device cuda --dtype bfloat16 \
        --rows 64 --batch-size 16 --seq-len 512                                  # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.collection.collector import (
    DEFAULT_SHARD_TOKENS,
    ActivationCollector,
    TokenRows,
)
from core.model_access.shapes import olmoe_1b_7b_config
from core.paths import REPO_ROOT

MODELS = ("default", "tiny-olmoe", "tiny-mixtral", "olmoe-shape", "olmoe-1b-7b")


def build_model(name: str, models_dir: Path, layers: int | None = None) -> tuple[torch.nn.Module | str, str]:
    """The model to benchmark and a line saying what it is."""
    if name == "default":
        from core.study_moe.config import DEFAULT_CONFIG, TrainConfig
        from core.study_moe.model import StudyMoeConfig, StudyMoeForCausalLM

        cfg = TrainConfig.from_yaml(DEFAULT_CONFIG)
        run_dir = models_dir / cfg.run_name
        if (run_dir / "config.json").is_file() and layers is None:
            return str(run_dir), f"embedded default model, trained ({run_dir})"
        torch.manual_seed(0)
        model = StudyMoeForCausalLM(StudyMoeConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=layers or cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=max(512, cfg.seq_len), num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        ))
        return model.eval(), "embedded default model architecture with random weights (same speed as trained)"
    import transformers

    if name == "tiny-mixtral":
        cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=layers or 3,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                         num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg._experts_implementation = "eager"
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(cfg).eval(), (f"tiny random Mixtral (hidden 32, {cfg.num_hidden_layers} "
                                                              "layers, 8 experts, top-2)")
    if name == "tiny-olmoe":
        cfg = transformers.OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=layers or 2,
                                       num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
        what = f"tiny random OLMoE (hidden 32, {cfg.num_hidden_layers} layers, 8 experts, top-2)"
    elif name == "olmoe-shape":
        cfg = transformers.OlmoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=128, num_hidden_layers=layers or 4,
                                       num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
        what = f"random OLMoE with OLMoE's routing shape (64 experts, top-8), hidden 256, {cfg.num_hidden_layers} layers"
    elif name == "olmoe-1b-7b":
        cfg = olmoe_1b_7b_config(layers or 2)
        what = (f"random OLMoE-1B-7B at its real dimensions (hidden 2048, experts 1024, 64 experts top-8, vocabulary 50304), "
                f"{cfg.num_hidden_layers} of its 16 layers")
    else:
        return name, f"{name} (loaded by MoEModelWrapper)"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    return transformers.OlmoeForCausalLM(cfg).eval(), what


def make_rows(vocab: int, rows: int, seq_len: int, seed: int = 0, full: bool = False) -> TokenRows:
    """Random token rows with realistic right padding (lengths between half and full), or none with ``full``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (rows,), generator=g)
    if full:
        lengths = torch.full((rows,), seq_len)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    doc = torch.arange(rows)[:, None].expand(rows, seq_len).masked_fill(mask == 0, -1).clone()
    return TokenRows(ids * mask, mask, doc_ids=doc, dataset_names=["random"], domain_names=["random"])


@contextmanager
def bare(model: torch.nn.Module):
    """The model as a user has it without nnsight: its hooks and forward wrappers set aside for a while.

    nnsight instruments every module once the wrapper is built (a hook pair and a forward
    wrapper each, cheap when no trace runs but not free); the reference must not pay for them.
    """
    saved = []
    for m in model.modules():
        saved.append((m, dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.pop("forward", None)))
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    try:
        yield model
    finally:
        for m, hooks, pre, fwd in saved:
            m._forward_hooks.update(hooks)
            m._forward_pre_hooks.update(pre)
            if fwd is not None:
                m.__dict__["forward"] = fwd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PairedReference:
    """Wraps the wrapper so every traced batch also goes through the plain forward and a hooked forward.

    The plain forward (no router outputs asked for, no nnsight instrumentation) and the same
    forward with PyTorch hooks on the routers run on the same batch right next to the traced one, in rotating order; each is
    timed per batch and kept out of the collection's time.
    """

    def __init__(self, wrapper, clock=time.perf_counter):
        self.wrapper, self.clock = wrapper, clock
        self.times: dict[str, list[float]] = {"reference": [], "hooks": [], "trace": []}
        self.untimed = 0.0  # setting nnsight's instrumentation aside and back: neither the forward's time nor the collection's
        self.routers = [wrapper._modules[info.router_path] for info in wrapper.layers]
        self._identity_memo = getattr(wrapper, "_identity_memo", None)  # the weights digest, as a long run keeps it

    def __getattr__(self, name):
        return getattr(self.wrapper, name)

    def _timed(self, key: str, fn, bare_model: bool = False):
        """``fn()`` timed; with ``bare_model`` nnsight's instrumentation is set aside around it, outside the time."""
        dev = self.wrapper._device()
        outer = self.clock()
        with bare(self.wrapper.hf_model) if bare_model else nullcontext():
            _sync(dev)
            start = self.clock()
            out = fn()
            _sync(dev)
            self.times[key].append(self.clock() - start)
        self.untimed += self.clock() - outer - self.times[key][-1]
        return out

    def _plain(self, ids, mask, hook_routers: bool = False) -> None:
        """The forward; with ``hook_routers``, a minimal PyTorch hook on each router keeps its logits, copied once to the host."""
        dev = self.wrapper._device()
        saved: list[torch.Tensor] = []
        hook = lambda module, args, out: saved.append(out[0] if isinstance(out, (tuple, list)) else out)  # noqa: E731
        with torch.no_grad():
            handles = [m.register_forward_hook(hook) for m in self.routers] if hook_routers else []
            try:
                self.wrapper.hf_model(ids.to(dev), attention_mask=mask.to(dev))
            finally:
                for h in handles:
                    h.remove()
        if hook_routers:
            torch.cat([t.reshape(-1) for t in saved]).cpu()

    start_trace = None  # so the collector calls trace_routing below, one batch at a time (no overlap to time)

    def trace_routing(self, input_ids, attention_mask=None, hidden_layers=()):
        jobs = {"reference": lambda: self._plain(input_ids, attention_mask),
                "hooks": lambda: self._plain(input_ids, attention_mask, hook_routers=True),
                "trace": lambda: self.wrapper.start_trace(input_ids, attention_mask, hidden_layers=hidden_layers).wait()}
        order = list(jobs)
        shift = len(self.times["trace"]) % len(order)
        out = None
        for key in order[shift:] + order[:shift]:
            r = self._timed(key, jobs[key], bare_model=key != "trace")
            out = r if key == "trace" else out
        return out


def paired_run(wrapper, rows: TokenRows, batch_size: int, storage: str | None, shard_tokens: int,
               clock=time.perf_counter) -> dict:
    """One pass of collection (trace only when ``storage`` is None) with the paired references.

    Returns per-batch plain-forward, hooked-forward and trace seconds, and ``rest_s``: everything
    else the collection spent (metadata, precision conversion, shard encoding, checksums, writes, fsync).
    """
    paired = PairedReference(wrapper, clock)
    collector = ActivationCollector(paired, progress=False)
    out: dict = {}
    start = clock()
    if storage is None:
        for _ in collector.trace_batches(rows, batch_size=batch_size, float_dtype=torch.float16):
            pass
    else:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as d:
            cache = collector.collect(rows, d, batch_size=batch_size, storage=storage, shard_tokens=shard_tokens,
                                      progress=False)
            out.update(bytes_per_token=cache.bytes_per_token(), tokens=cache.num_tokens)
    total = clock() - start
    wrapper._identity_memo = paired._identity_memo
    out.update(paired.times, rest_s=total - paired.untimed - sum(sum(v) for v in paired.times.values()))
    return out


def best_of(runs: list[dict], key: str) -> float:
    """Sum over batches of each batch's fastest time across repeats: the time without others' load."""
    return sum(min(times) for times in zip(*(r[key] for r in runs), strict=True))


def olmoe_bytes_per_token(layers: int = 16, experts: int = 64, k: int = 8, tokens: int = 4096) -> dict[str, float]:
    """Shard bytes per token at OLMoE-1B-7B's routing shape, measured by encoding a shard of random routing.

    Labels as a real run has them: 50k-vocabulary token ids, positions under 4096, a few domains.
    """
    from safetensors.torch import save as st_save

    from core.routing_data import RoutingData
    from core.store.cache_format import encode_shard

    g = torch.Generator().manual_seed(0)
    rd = RoutingData(
        moe_layers=list(range(layers)), num_experts=experts, top_k=k,
        router_logits=torch.randn(tokens, layers, experts, generator=g),
        topk_idx=torch.rand(tokens * layers, experts, generator=g).argsort(-1)[:, :k].view(tokens, layers, k),
        topk_weight=torch.rand(tokens, layers, k, generator=g), token_ids=torch.randint(0, 50_280, (tokens,), generator=g),
        doc_ids=torch.arange(tokens) // 300, positions=torch.arange(tokens) % 4096,
        domain_ids=torch.arange(tokens) % 3, dataset_ids=torch.arange(tokens) % 3,
    )
    out = {}
    for storage in ("full", "compact"):
        payload = st_save(encode_shard(rd, {"storage": storage, "dtype": "float16"}), metadata={"rows": "0:1"})
        out[storage] = round(len(payload) / tokens, 1)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="default",
                   help=f"one of {MODELS} or a Hub name / local model folder (default: the embedded model)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers of a built model (olmoe-1b-7b: default 2 of 16; use 16 on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="model precision, e.g. bfloat16 on a GPU (default: float32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=32, help="rows of random tokens per repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; per batch the fastest is kept")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (the collector's default)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="what is timed: CPU time of this process (time.process_time) or wall time; auto: CPU on the CPU, wall on a GPU")
    p.add_argument("--full-rows", action="store_true", help="rows without padding (every row --seq-len tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it: oversubscribed threads give erratic times)")
    p.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    return p


def overhead(runs: list[dict], over: str) -> dict:
    """Median and quartiles, over every batch of every pass, of its trace time divided by the same batch's ``over`` time."""
    ratios = [t / o for r in runs for t, o in zip(r["trace"], r[over], strict=True)]
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": med, "q1": q1, "q3": q3, "batches": len(ratios)}


def summarize(runs: dict[str, list[dict]], tokens: int) -> dict:
    """Best-of-repeats estimates (robust to a shared machine), the median of the paired per-pass ratios,
    and the tracing overhead per batch against the plain and the hooked forward."""
    all_runs = [r for k in runs for r in runs[k]]
    ref_s, hooks_s = best_of(all_runs, "reference"), best_of(all_runs, "hooks")
    trace_s = best_of(all_runs, "trace")  # tracing is the same work in every mode: use every sample
    seconds = {k: trace_s + min(r["rest_s"] for r in runs[k]) for k in runs}
    paired = {k: [sum(r["reference"]) / (sum(r["trace"]) + r["rest_s"]) for r in runs[k]] for k in runs}
    return {
        "tokens_per_s": {"reference": tokens / ref_s, "hooks": tokens / hooks_s, **{k: tokens / seconds[k] for k in runs}},
        "ratio_vs_forward": {"hooks": ref_s / hooks_s, **{k: ref_s / seconds[k] for k in runs}},
        "paired_ratio_median": {k: statistics.median(v) for k, v in paired.items()},
        "paired_ratio_per_repeat": paired,
        "bytes_per_token": {k: runs[k][0]["bytes_per_token"] for k in ("full", "compact")},
        "olmoe_1b_7b_bytes_per_token": olmoe_bytes_per_token(),
        "trace_over_forward": overhead(all_runs, "reference"), "trace_over_hooks": overhead(all_runs, "hooks"),
        "overhead_s": {"tracing": trace_s - ref_s, "hooks": hooks_s - ref_s,
                       "writing": min(r["rest_s"] for r in runs["full"]), "reference": ref_s},
    }


def print_table(result: dict) -> None:
    """The numbers as a table, each mode's rate and its ratio to the plain forward."""
    tps, ratio, paired = result["tokens_per_s"], result["ratio_vs_forward"], result["paired_ratio_per_repeat"]
    over, bpt, tokens = result["overhead_s"], result["bytes_per_token"], result["tokens"]
    print(f"\n{'':30}{'tokens/s':>10}{'ratio':>8}{'paired median':>15}   paired per repeat")
    print(f"{'plain forward (reference)':30}{tps['reference']:10.0f}{1.0:8.2f}")
    print(f"{'forward + PyTorch router hooks':30}{tps['hooks']:10.0f}{ratio['hooks']:8.2f}")
    for label, key in [("trace only (no cache)", "trace"), ("collect, full storage", "full"),
                       ("collect, compact storage", "compact")]:
        per = ", ".join(f"{x:.2f}" for x in paired[key])
        print(f"{label:30}{tps[key]:10.0f}{ratio[key]:8.2f}{result['paired_ratio_median'][key]:15.2f}   {per}")
    target = result["target"]
    verdict = "meets" if ratio["full"] >= target else "BELOW"
    print(f"\nratio collection/plain forward, full storage: {ratio['full']:.3f} (best of {result['repeats']} per batch), "
          f"{result['paired_ratio_median']['full']:.3f} (median of paired passes); {verdict} the target >= {target} "
          f"(set for OLMoE's real dimensions)")
    print(f"overhead per pass of {tokens} tokens over the forward's {over['reference']:.3f} s: "
          f"tracing {over['tracing']:+.3f} s, cache writing {over['writing']:+.3f} s (PyTorch hooks: {over['hooks']:+.3f} s)")
    for label, key in [("plain forward", "trace_over_forward"), ("forward with PyTorch router hooks", "trace_over_hooks")]:
        o = result[key]
        print(f"trace time / {label}, per batch ({result['clock']} time): median {o['median']:.3f} "
              f"(quartiles {o['q1']:.3f}-{o['q3']:.3f}, {o['batches']} batches)")
    print(f"bytes per token on disk: full {bpt['full']:.1f}, compact {bpt['compact']:.1f}")
    ob = result["olmoe_1b_7b_bytes_per_token"]
    print(f"  (OLMoE-1B-7B shape, 16 layers x 64 experts, top-8: full {ob['full']} B/token, compact {ob['compact']} B/token)")


def main(argv: list[str] | None = None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.rows < 1 or args.seq_len < 2 or args.repeats < 1 or (args.layers is not None and args.layers < 1):
        p.error("--batch-size, --rows, --repeats, --layers must be >= 1 and --seq-len >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    from core.owned_files import JSON_MARK, OwnershipError, check_output_file, marked_json

    try:
        if args.out:  # before any work: never overwrite a file this toolkit did not write
            check_output_file(args.out, JSON_MARK, "choose another --out")
    except OwnershipError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from core.model_access.wrapper import MoEModelWrapper
    from core.safe_io import atomic_write_json

    model, what = build_model(args.model, args.models_dir, args.layers)
    wrapper = MoEModelWrapper(model, device=args.device, dtype=args.dtype)
    vocab = int(wrapper.hf_model.config.vocab_size)
    rows = make_rows(vocab, args.rows, args.seq_len, full=args.full_rows)
    tokens = int(rows.attention_mask.sum())
    dev = wrapper._device()
    clock_name = args.clock if args.clock != "auto" else ("wall" if dev.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {what}")
    print(f"  MoE layers {wrapper.moe_layers}, {wrapper.num_experts} experts, top-{wrapper.top_k}; "
          f"{args.rows} rows x {args.seq_len} (batch {args.batch_size}), {tokens} non-padding tokens; "
          f"{hardware}, {next(wrapper.hf_model.parameters()).dtype}")

    warm = TokenRows(rows.input_ids[: args.batch_size], rows.attention_mask[: args.batch_size])
    paired_run(wrapper, warm, args.batch_size, None, args.shard_tokens, clock)

    modes = {"trace": None, "full": "full", "compact": "compact"}
    runs: dict[str, list[dict]] = {k: [] for k in modes}
    for _ in tqdm(range(args.repeats), desc="benchmark", unit="repeat"):
        for key, storage in modes.items():
            r = paired_run(wrapper, rows, args.batch_size, storage, args.shard_tokens, clock)
            if storage is not None and r["tokens"] != tokens:
                raise RuntimeError(f"cache holds {r['tokens']} tokens, expected {tokens}")
            runs[key].append(r)

    result = {"model": what, "hardware": hardware, "dtype": str(next(wrapper.hf_model.parameters()).dtype),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": tokens,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "clock": clock_name,
              "target": 0.9 if dev.type == "cuda" else 0.95, **summarize(runs, tokens)}
    print_table(result)
    if args.out:
        atomic_write_json(args.out, marked_json(result))
        print(f"wrote {args.out}")
    return result
