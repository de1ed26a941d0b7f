"""Judgments per second of the ``local`` judge backend, batching concurrent requests vs one at a time.

    python benchmarks/judge_batching.py [--concurrent 16] [--max_new_tokens 64]

All runs use the same small random Llama (built here, nothing is downloaded), the same judge
prompts and greedy decoding; ``--concurrent`` threads each ask for one judgment at
once, as OpenRLHF's reward threads (or the HTTP server's workers) do. Three runs, so that
the two effects are measured apart:

* "one at a time": :class:`LocalJudge` with ``batch_size=1`` (no batching; a lone prompt has
  no prefix to share);
* "batched": ``batch_size=concurrent`` with shared-prefix prefill off
  (``share_prefix_min_tokens=0``): batching alone, like with like;
* "batched + shared prefix": the same with the default shared-prefix prefill (every prompt
  starts with the same system prompt and exemplars, as one person's judgments do).

The random model never writes EOS, so every judgment decodes exactly ``--max_new_tokens``
tokens in every run. ``speedup`` (last line) is batching alone: one at a time / batched;
``prefix_gain`` is batched / batched + shared prefix.

Then the evidence an evidence-informed judge reads (``openrlhf_persrm.evidence``): the same model as
the frozen scorer measures both candidates of every judgment (exemplar gain, fluency, style, copying;
four scoring passes per pair, the exemplars' context shared), batched like the judge.
``evidence_cost`` is its seconds per judgment over the batched judge's (the reward measures a pair once
for its two judgments, so the cost per reward call is half of it).

Then the ``persrm`` plugin's own cost per reward call (one sample, two judgments, as OpenRLHF
calls it), with model time excluded: the backend is a stub answering instantly. Prints
``speedup=<ratio>`` last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

EXEMPLARS = [
    "I walk the dog before sunrise, rain or shine, and I do not miss a day. The street is quiet then.",
    "Coffee first. Then the list: three things, never more, written in pencil on the back of an envelope.",
]


def english_llama(folder: str, *, hidden: int, layers: int, kv_heads: int = 1, vocab: int = 4096) -> str:
    """A random Llama whose BPE tokenizer is trained on the shipped demo corpus (English prose).

    tests/_tiny.py's tokenizer knows a few sentences, so it spends ~1.6 characters per token;
    this one spends ~4, like real tokenizers, so judge prompts have realistic token counts.
    """
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from _tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    corpus = REPO / "openrlhf_persrm" / "data" / "demo_corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, initializer_range=0.2, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    path = os.path.join(folder, f"random-llama-h{hidden}-l{layers}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(n: int) -> list[list[dict[str, str]]]:
    from openrlhf_persrm.judge_format import build_messages

    return [build_messages(EXEMPLARS, f"Describe your morning, day {i}.",
                           f"Up at six. Dog walked, coffee made, list written: day {i}.",
                           f"My mornings are wonderfully relaxed and I love sleeping in on day {i}!")
            for i in range(n)]


def concurrent_judgments(judge, requests) -> tuple[float, list[str]]:
    """Wall seconds for ``len(requests)`` threads each asking for one judgment at once."""
    outputs: list = [None] * len(requests)
    start = threading.Barrier(len(requests) + 1)

    def ask(i: int) -> None:
        start.wait()
        outputs[i] = judge.generate([requests[i]])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, outputs


def evidence_seconds(model_path: str, n: int) -> float:
    """Wall seconds to measure the evidence on the candidates of ``n`` judgments (batched, after a warm-up)."""
    from openrlhf_persrm.evidence import EvidenceInput, LocalScorer, measure_pairs

    items = [EvidenceInput(tuple(EXEMPLARS), f"Describe your morning, day {i}.",
                           f"Up at six. Dog walked, coffee made, list written: day {i}.",
                           f"My mornings are wonderfully relaxed and I love sleeping in on day {i}!") for i in range(n)]
    scorer = LocalScorer(model_path=model_path, batch_size=n, cache_size=0)
    measure_pairs(scorer, items[:1])
    t0 = time.perf_counter()
    measure_pairs(scorer, items)
    return time.perf_counter() - t0


def plugin_overhead_us(n_calls: int) -> float:
    from openrlhf_persrm.rewards.persrm import PersRMReward

    class InstantJudge:
        name = "instant"

        def generate(self, requests):
            return ["<think>\nterse, like the exemplars\n</think>\n<answer>[8, 3]</answer>"] * len(requests)

    reward = PersRMReward(backend=InstantJudge())
    label = {"exemplars": EXEMPLARS, "reference": "Up at six, dog walked, coffee made.",
             "prompt": "Describe your morning."}
    prompt = "<|im_start|>user\nDescribe your morning.<|im_end|>\n<|im_start|>assistant\n"
    query = prompt + "Up at seven. The dog, the coffee, the list.<|im_end|>"
    for _ in range(50):
        reward([query], [prompt], [label])
    t0 = time.perf_counter()
    for _ in range(n_calls):
        out = reward([query], [prompt], [label])
    assert out.extra_logs["judge_failed"] == [0.0]
    return (time.perf_counter() - t0) / n_calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrent", type=int, default=16, help="judgments requested at once")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="tokens each judgment decodes")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=1, help="KV heads of the 4 attention heads (grouped-query)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before torch loads OpenMP: spinning worker threads collapse on a shared, oversubscribed CPU
    # (a step took 10-20x longer at load 5 on 2 cores); passive waiting costs little when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from openrlhf_persrm.contracts import JudgeRequest
    from openrlhf_persrm.judges.local import LocalJudge

    with tempfile.TemporaryDirectory() as tmp:
        path = english_llama(tmp, hidden=args.hidden, layers=args.layers, kv_heads=args.kv_heads)
        requests = [JudgeRequest(m, max_new_tokens=args.max_new_tokens) for m in prompts(args.concurrent)]
        results = {}
        runs = (("batched", args.concurrent, 0), ("batched + shared prefix", args.concurrent, 32),
                ("one at a time", 1, 0))
        for label, batch_size, share in runs:
            judge = LocalJudge(path, batch_size=batch_size, share_prefix_min_tokens=share)
            if label == "batched":
                engine = judge.engine
                n_params = sum(p.numel() for p in engine.model.parameters())
                n_prompt = [judge.count_tokens(r.messages) for r in requests]
                cfg = engine.model.config
                print(f"model: random Llama, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                      f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params, float32")
                print(f"inputs: {len(requests)} judge prompts of {min(n_prompt)}-{max(n_prompt)} tokens, "
                      f"{args.max_new_tokens} new tokens each (greedy); torch threads {torch.get_num_threads()}, "
                      f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
            judge.generate(requests[:1])  # warm-up: load, first forward passes
            before = judge.stats["generated_tokens"]
            seconds, outputs = concurrent_judgments(judge, requests)
            results[label] = (seconds, outputs)
            tokens = judge.stats["generated_tokens"] - before
            print(f"{label:>23}: {len(requests)} judgments ({tokens} tokens) in {seconds:6.2f} s = "
                  f"{len(requests) / seconds:6.2f} judgments/s", flush=True)
            judge.close()
        evidence_s = evidence_seconds(path, args.concurrent)
    for label in ("batched", "batched + shared prefix"):
        same = sum(a == b for a, b in zip(results[label][1], results["one at a time"][1]))
        print(f"identical greedy outputs, {label} vs one at a time: {same}/{len(requests)}")
    shared_s = results["batched + shared prefix"][0]
    print(f"evidence for {args.concurrent} pairs (same model as scorer, batched): {evidence_s:6.2f} s = "
          f"{evidence_s / args.concurrent * 1000:.0f} ms per judgment, against {shared_s / args.concurrent * 1000:.0f} "
          f"ms per judgment (batched + shared prefix)")
    print(f"evidence_cost={evidence_s / shared_s:.2f}")
    print(f"persrm plugin overhead per reward call (1 sample, 2 judgments, stub backend): "
          f"{plugin_overhead_us(2000):.0f} us")
    one, batched, shared = (results[k][0] for k in ("one at a time", "batched", "batched + shared prefix"))
    print(f"batching with shared prefix vs one at a time: {one / shared:.2f}x")
    print(f"prefix_gain={batched / shared:.2f}")
    print(f"speedup={one / batched:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
