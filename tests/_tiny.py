"""A tiny random causal LM saved to disk, for tests that need a real HF checkpoint.

Nothing is downloaded: the byte-level BPE tokenizer is trained in-process on a fixed
corpus and the Llama weights are drawn from a fixed seed, so the same call gives the
same files on every machine (and takes well under a second).
"""

from __future__ import annotations

from pathlib import Path

# A ChatML-style template: enough for `apply_chat_template` in OpenRLHF's prompt datasets.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The user prefers short answers. Response A is better than response B.",
    "Which response follows the user's persona more closely? Answer with A or B.",
    "I like hiking, cooking and reading science fiction on rainy weekends.",
    "<think> compare both responses against the rubric </think> <answer>A</answer>",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Personalised reward models judge pairs of answers for a given user profile.",
]


def train_tokenizer(vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on a fixed corpus and wrap it for transformers.

    Byte-level means every string encodes (no unknown tokens), which tests of stop
    strings and chat prompts rely on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    tmpdir: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    initializer_range: float = 0.2,
    seed: int = 0,
    max_position_embeddings: int = 1024,
) -> str:
    """Save a random ``LlamaForCausalLM`` and its tokenizer under ``tmpdir``; return the path.

    ``initializer_range`` is larger than Llama's 0.02 on purpose: with near-uniform logits
    greedy decoding would hinge on float rounding noise, and tests comparing greedy runs
    (batched against one at a time) would be comparing noise.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(tmpdir) / f"tiny-llama-h{hidden_size}-l{num_layers}-s{seed}"
    if (path / "config.json").exists():
        return str(path)
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    # fork_rng: seeding must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def param_digests(model_path: str) -> dict[str, str]:
    """sha256 of every parameter as float32 bytes, as the CPU engine records them."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return {n: hashlib.sha256(p.detach().float().contiguous().numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def tiny_judge_lm(tmpdir: str | Path, prompts: list[list[dict]], *, steps: int = 100, seed: int = 0) -> str:
    """A tiny model taught (teacher forcing, plain torch) to answer judge prompts in the judge format.

    Its targets mix both verdicts (``[8, 3]`` and ``[3, 8]``) so sampled judgments vary and a
    GRPO group gets rewards with non-zero spread, as a real SFT'd judge would. Deterministic.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_causal_lm(tmpdir, seed=seed, max_position_embeddings=4096, initializer_range=0.02)
    path = Path(tmpdir) / f"tiny-judge-s{seed}-n{steps}"
    if (path / "config.json").exists():
        return str(path)
    tok = AutoTokenizer.from_pretrained(base)
    tok.eos_token = "<|im_end|>"  # end of the assistant turn ends generation, as in chat models
    targets = ["<think>x</think><answer>[8, 3]</answer>", "<think>x</think><answer>[3, 8]</answer>"]
    rows = []
    for i, messages in enumerate(prompts):
        p = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        t_ids = tok(targets[i % 2] + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, t_ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for step in range(steps):
            p_ids, t_ids = rows[step % len(rows)]
            ids = torch.tensor([p_ids + t_ids])
            labels = torch.full_like(ids, -100)
            labels[0, len(p_ids):] = ids[0, len(p_ids):]
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
