"""Tiny generation models built here and saved locally, for the generation tests: Marian, T5 and BART
with MiniLM's WordPiece tokenizer, GPT-2 and a Llama-style decoder with a byte-level BPE tokenizer trained
here (with the `tokenizers` library) on WMT22 and IMDb text and given a chat template.

Weights are random with a large variance, so that outputs depend on the input; the end token's logit is
raised (`_end_sometimes`) so that some rows end early and others run to the limit, as a real model's do.
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ["<|endoftext|>", "<|bos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def _end_sometimes(model, inputs: dict, end: int, rate: float) -> None:
    """Make the end token win about `rate` of the greedy steps on these inputs: its output embedding row
    moves along the mean of what the LM head sees, as far as makes it the best token at that share of
    the steps of a greedy generation (so that rows end at different steps)."""
    import torch

    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(
        (args[0][:, -1].detach().clone(), out[:, -1].detach().clone())))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    hook.remove()
    states = torch.cat([h for h, _ in seen])
    logits = torch.cat([o for _, o in seen])
    direction = states.mean(dim=0)
    direction = direction / direction.norm()
    gap = logits.max(dim=-1).values - logits[:, end]
    along = states @ direction
    ratio = torch.where(along > 0, gap / along.clamp(min=1e-6), torch.full_like(gap, float("inf")))
    scale = torch.quantile(ratio[torch.isfinite(ratio)], rate)
    with torch.no_grad():
        head.weight[end] += scale * direction


def seq2seq_builders(tokenizer, t5_init: float = 2.0, t5_tied: bool = False) -> dict:
    """Builders of tiny random Marian, T5 and BART models for MiniLM's WordPiece `tokenizer` ([CLS] starts
    the decoder, [SEP] ends, [PAD] pads), with weights of a large variance (T5's: `t5_init`)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    ids = {"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 102, "decoder_start_token_id": 101,
           "forced_eos_token_id": None}
    small = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "max_position_embeddings": 512}
    return {
        "marian": lambda: MarianMTModel(MarianConfig(**small, **ids, init_std=1.0, decoder_vocab_size=len(tokenizer))),
        "t5": lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                          initializer_factor=t5_init, tie_word_embeddings=t5_tied,
                                                          **ids)),
        "bart": lambda: BartForConditionalGeneration(BartConfig(**small, **ids, init_std=0.3)),
    }


def seq2seq_models(root: Path, minilm: str, texts: list[str]) -> dict[str, str]:
    """Marian, T5 and BART directories (`seq2seq_builders`), their end token raised to end some rows early."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    enc = tokenizer(texts[:40], padding=True, truncation=True, max_length=128, return_tensors="pt",
                    return_token_type_ids=False)
    paths = {}
    for name, build in seq2seq_builders(tokenizer).items():
        torch.manual_seed(0)
        model = build().eval()
        _end_sometimes(model, dict(enc), 102, 0.04 if name == "bart" else 0.08)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def bpe_tokenizer(texts: list[str], bos: bool):
    """A byte-level BPE tokenizer (2,000 tokens) trained on `texts`, with end, pad and chat tokens, a chat
    template, and (`bos`) a beginning token added to every text, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def decoder_models(root: Path, texts: list[str]) -> dict[str, str]:
    """GPT-2 (its tokenizer adds no token) and a Llama-style decoder (its tokenizer adds <|bos|>): 256
    positions each, end token <|endoftext|>."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    paths = {}
    for name in ("gpt2", "llama"):
        tokenizer = bpe_tokenizer(texts, bos=name == "llama")
        ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False}
        torch.manual_seed(0)
        if name == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                               initializer_range=0.3, **ids))
        else:
            model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=256, initializer_range=0.3,
                                                 pad_token_id=tokenizer.pad_token_id, **ids))
        model.eval()
        tokenizer.padding_side = "left"
        prompts = tokenizer(texts[:40], return_tensors="pt", truncation=True, max_length=64, padding=True)
        _end_sometimes(model, dict(prompts), tokenizer.eos_token_id, 0.04)
        tokenizer.padding_side = "right"
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths
