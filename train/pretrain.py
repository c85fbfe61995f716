"""`tritongpt pretrain`: next-token prediction on a text corpus, through the shared Trainer.

With no arguments it trains the `tiny` preset on the embedded corpus (Python's pydoc topics)
with the default 4096-token BPE, on whatever device there is, in a few minutes on a laptop
CPU; it prints samples as it goes and writes metrics.jsonl, loss.png, checkpoints and the
tokenizer to --out-dir. On a GPU:

    tritongpt pretrain --model gpt2-small --kernels triton --dtype bf16

`--init` starts from trained weights instead (a run, a GPT-2 file or name), as nanoGPT's
init_from does to fine-tune GPT-2 on Shakespeare with the pretraining objective.

The pieces: train.data tokenises the corpus once into a memmap (or memmaps a .bin of token
ids where it lies) and draws random windows;
the model is a GPTModel whose vocabulary is the tokenizer's and which computes its own loss
(lm_loss, or the Triton cross-entropy on that path); the Trainer (train/loop.py) does the rest.
"""
import argparse
import math
import os
from pathlib import Path

import torch

from tritongpt.errors import UserError, note
from tritongpt.train.tokenizer import HF_WEIGHTS_HELP, HUB_REPO_HELP, TOKENIZER_CHOICES
from tritongpt.model.config import GATED_MLPS, GELU_APPROXIMATES, MLPS, NORMS, POSITION_ENCODINGS, window_layers_arg
from tritongpt.cli import command_help

DEFAULTS = dict(out_dir="runs/pretrain", max_steps=300, batch_size=16, grad_accum=1, lr=2e-3, min_lr=2e-4,
                warmup_steps=30, weight_decay=0.1, eval_every=50, eval_batches=8, ckpt_every=100,
                log_every=25, sample_every=100)
SAMPLE_DEFAULTS = dict(prompt="The", temperature=0.8, top_k=40)  # the samples printed while training


def add_args(p: argparse.ArgumentParser):
    from tritongpt.commands import add_model_args, add_vocab_multiple_arg
    from tritongpt.train.distill import add_distill_args
    from tritongpt.train.loop import add_lm_loss_args, add_train_args

    add_model_args(p, default_model=None, default_text="tiny; with --init, what its weights hold")
    p.add_argument("--init", default=None,
                   help="start from these weights, not random ones (nanoGPT's init_from): a tritongpt checkpoint "
                        "(run folder, ckpt folder or .safetensors), " + HF_WEIGHTS_HELP + ", or a GPT-2 or GPT-Neo "
                        "name (gpt2-small, gpt-neo-125m ...: downloads the pretrained weights), or " + HUB_REPO_HELP
                        + "; the model's shape is theirs")
    add_vocab_multiple_arg(p, 1, "1, no padding; with --init, as its weights have them")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, action=DataArg,
                   help="training text: a file, a folder of .txt (or .parquet) files, a .jsonl or .parquet file, "
                        "or 'pydoc' / "
                        "'stdlib' (default: the embedded pydoc corpus); or token ids already made, a .bin of "
                        "uint16 as nanoGPT's prepare.py writes, or its folder with train.bin and val.bin (read in "
                        "place, any size; with --tokenizer gpt2). Repeat it to train on a mixture: each source "
                        "tokenised, cached and split (--val-fraction) on its own, each batch row drawn from one of "
                        "them (--data-weights), and each evaluated alone too (val_loss_<name>)")
    d.add_argument("--data-weights", type=float, nargs="+", default=None, metavar="W",
                   help="with several --data: one weight per source, in their order (finite, >= 0, not all 0; "
                        "normalised): each batch row is drawn from source i with probability w_i / sum(w), then a "
                        "random window within it (default: proportional to each source's training tokens, as if "
                        "they were one corpus)")
    d.add_argument("--text-field", default="text",
                   help="field holding the text in .jsonl rows (a .parquet's column) (default %(default)s)")
    d.add_argument("--tokenizer", default=None,
                   help=TOKENIZER_CHOICES + " (default: default, BPE-4096 on the embedded corpus; with --init, "
                        "the one saved with its run, else gpt2 for a 50257 vocab)")
    d.add_argument("--block-size", type=int, default=None,
                   help="tokens per training sequence (default: the model's context length)")
    d.add_argument("--val-fraction", type=float, default=None,
                   help="held-out tail of the corpus (default 0.1; a nanoGPT folder's own val.bin where it has one)")
    d.add_argument("--cache-dir", default=None, help="where the tokenised corpus is cached "
                                                     "(default: ~/.cache/tritongpt or $TRITONGPT_CACHE)")
    d.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--logit-softcap", type=float, default=None, metavar="C",
                   help="soft-cap the new model's logits to C tanh(logits / C) (GPTConfig.logit_softcap; Gemma 2 "
                        "uses 30, modded-nanogpt 15 to 30; in the loss and in sampling alike, and such a model cannot "
                        "be exported to Hugging Face's GPT-2; default: none, or what --init's model has)")
    p.add_argument("--logit-scale", type=float, default=None, metavar="S",
                   help="multiply the new model's logits by S (GPTConfig.logit_scale; Cohere's Command R uses 0.0625; "
                        "applied to the LM head's input on both kernel paths; such a model exports as a Cohere only; "
                        "default: 1, or what --init's model has)")
    p.add_argument("--embedding-multiplier", type=float, default=None, metavar="M",
                   help="multiply the new model's token embeddings by M (GPTConfig.embedding_multiplier: muP's input "
                        "multiplier, Granite 3's 12.0; both kernel paths; default: 1, or what --init's model has)")
    p.add_argument("--residual-multiplier", type=float, default=None, metavar="M",
                   help="multiply each block's attention and MLP outputs by M before they join the residual stream "
                        "(GPTConfig.residual_multiplier: muP's, Granite 3's 0.22; default: 1, or --init's)")
    p.add_argument("--attention-multiplier", type=float, default=None, metavar="M",
                   help="scale the attention scores by M in place of 1/sqrt(head_dim) (GPTConfig.attention_multiplier: "
                        "muP's 1/head_dim, Granite 3's 0.015625; the Triton attention's softmax scale too; default: "
                        "1/sqrt(head_dim), or --init's). A model with any of these multipliers exports as a Granite "
                        "(GraniteMoe with --n-experts) only; Granite's logits_scaling L is --logit-scale 1/L")
    p.add_argument("--attn-softcap", type=float, default=None, metavar="C",
                   help="soft-cap the new model's attention scores to C tanh(s / C) before the softmax "
                        "(GPTConfig.attn_softcap; Gemma 2 uses 50; both kernel paths compute it; default: none, or "
                        "what --init's model has)")
    p.add_argument("--parallel-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="GPT-NeoX's (Pythia's) parallel blocks for the new model: attention and MLP both read each "
                        "block's input through their own LayerNorm, x + attn(ln1(x)) + mlp(ln2(x)) "
                        "(GPTConfig.parallel_residual; default: GPT-2's sequential blocks, or what --init's model has)")
    p.add_argument("--shared-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="Phi-1/1.5/2's (GPT-J's) parallel blocks with one LayerNorm: x + attn(ln1(x)) + mlp(ln1(x)), "
                        "no second norm (GPTConfig.shared_norm; with --parallel-residual only; default: no, or what "
                        "--init's model has)")
    p.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="a bias on the new model's LM head, as Phi-1/1.5/2 and GPT-J have (GPTConfig.head_bias; in "
                        "the fused Triton loss too; default: no, or what --init's model has)")
    p.add_argument("--alibi-scaled", action=argparse.BooleanOptionalAction, default=None,
                   help="Falcon-RW's ALiBi: the bias added before the scores' 1/sqrt(head_dim) scale, so the slopes "
                        "divided by sqrt(head_dim) (GPTConfig.alibi_scaled; with --position-encoding alibi; default: "
                        "no, or what --init's model has)")
    p.add_argument("--embed-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="a norm on the new model's token embeddings before the first block, as BLOOM has "
                        "(word_embeddings_layernorm; GPTConfig.embed_norm; default: no, or what --init's model has)")
    p.add_argument("--norm-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases on the new model's LayerNorms (GPTConfig.norm_bias; --no-norm-bias: none, as MPT's; "
                        "default: yes, or what --init's model has)")
    p.add_argument("--gelu-approximate", choices=GELU_APPROXIMATES, default=None,
                   help="the GELU MLP's GELU: tanh, GPT-2's approximation, or none, the exact erf one (GPT-NeoX's "
                        "and Pythia's; GPTConfig.gelu_approximate; fused into the Triton MLP kernel too). Default: "
                        "tanh, or what --init's model has")
    p.add_argument("--attention-window", type=int, default=None, metavar="W",
                   help="local attention for the new model: a token in a local layer attends to the last W "
                        "positions only, itself included (GPTConfig.attention_window; GPT-3's locally banded layers, "
                        "GPT-Neo's local ones with 256); the Triton kernel skips the tiles outside the window. Such a "
                        "model cannot be exported to Hugging Face's GPT-2. Default: none (0), or what --init's has")
    p.add_argument("--n-kv-head", type=int, default=None, metavar="N",
                   help="grouped-query attention for the new model: N key/value heads, each shared by n_head / N "
                        "query heads (GPTConfig.n_kv_head; Llama's 8 of 32, 1: multi-query); W_key, W_value and the "
                        "KV cache shrink by n_head / N. Such a model cannot be exported to Hugging Face's GPT-2. "
                        "Default: as many as the heads (0), or what --init's has")
    p.add_argument("--window-layers", type=window_layers_arg, default=None, metavar="all|odd|I,J,...",
                   help="which layers --attention-window makes local: all, odd (1, 3, 5, ...: GPT-Neo's "
                        "alternation with global layers), or a comma list of layer indices (Gemma 3's five local "
                        "layers to a global one: 0,1,2,3,4,6,...) (default: all, or what --init's model has)")
    p.add_argument("--position-encoding", choices=POSITION_ENCODINGS, default=None,
                   help="positions for the new model: learned, GPT-2's absolute embeddings, or rope, rotary "
                        "embeddings of each head's queries and keys (GPT-NeoX, Llama; GPTConfig.position_encoding: no "
                        "position embedding parameter; the Triton path rotates q and k in one kernel), or alibi, "
                        "a per-head linear bias on the scores by distance (BLOOM, MPT; inside the attention "
                        "kernel; no export writes it). A RoPE model "
                        "cannot be exported to Hugging Face's GPT-2; with --norm rmsnorm, --mlp swiglu and --no-bias "
                        "it is a Llama, which export writes. Default: learned, or what --init's model has")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="every norm of the new model (each block's two and the final one): layernorm, GPT-2's, or "
                        "rmsnorm, x / rms(x) * weight without a mean or a bias (Llama, Gemma; GPTConfig.norm; the "
                        "Triton path runs it through the LayerNorm kernel, the 'layernorm' of --kernels). Such a model "
                        "is exported as a Llama, not as GPT-2 or GPT-Neo. Default: layernorm, or what --init's model "
                        "has")
    p.add_argument("--rope-theta", type=float, default=None, metavar="T",
                   help="RoPE's base: dimension pair i turns by position * T^(-2i/head_dim) (GPTConfig.rope_theta; "
                        "default 10000, GPT-NeoX's and Llama 2's, or what --init's model has)")
    p.add_argument("--nope-layers", type=window_layers_arg, default=None, metavar="I,J,...",
                   help="layers of the new RoPE model whose q and k are not rotated (NoPE; GPTConfig.nope_layers): a "
                        "comma list, odd or all (SmolLM3's every fourth: 3,7,11,...). Such a model is exported as a "
                        "SmolLM3 (default: RoPE in every layer, or what --init's model has)")
    p.add_argument("--rotary-dim", type=int, default=None, metavar="R",
                   help="rotate only the first R dimensions of each head (partial rotary: Pythia's 16 of 64, "
                        "GPTConfig.rotary_dim; even, at most the head's width; needs --position-encoding rope). Such "
                        "a model is exported as a GPT-NeoX (LayerNorms, GELU) or a Phi-3 (RMSNorm, SwiGLU) "
                        "(default: the whole head, or what --init's model has)")
    p.add_argument("--mlp", choices=MLPS, default=None,
                   help="the new model's MLP: gelu, GPT-2's Linear(C -> 4C), GELU, Linear(4C -> C), or swiglu, Llama's "
                        "w_down(silu(w_gate x) * w_up x), or geglu, Gemma's, GELU (tanh) for silu, or relu2, GPT-2's "
                        "MLP with the squared ReLU relu(h)^2 for the GELU (Arcee's, Nemotron's, modded-nanogpt's) "
                        "(GPTConfig.mlp; the Triton path makes gate and up in one pass and fuses act(g) * u, and "
                        "fuses the GELU or relu^2 into the first matmul). A SwiGLU model is exported as a Llama, a "
                        "GeGLU one as a Gemma, a squared-ReLU one as an Arcee, not as GPT-2 or GPT-Neo. "
                        "Default: gelu, or what --init's model has")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in the new model's linear layers (GPTConfig.bias): GPT-2 has them; --no-bias drops "
                        "them all, as Llama, PaLM and modded-nanogpt do. Default: the preset's (biases), or what "
                        "--init's model has")
    p.add_argument("--mlp-hidden", type=int, default=None, metavar="H",
                   help="the SwiGLU, GeGLU or squared-ReLU MLP's hidden size (GPTConfig.mlp_hidden; default: Llama's "
                        "rule for the gated ones, 2/3 of 4 n_embd rounded up to a multiple of 64, about GPT-2's MLP "
                        "parameters: 2048 at n_embd 768; 4 n_embd for relu2)")
    p.add_argument("--n-experts", type=int, default=None, metavar="E",
                   help="a mixture of experts for the new model: each block's MLP is E SwiGLU or GeGLU experts (of "
                        "--mlp-hidden each) and a router, every token through its --experts-per-token best "
                        "(GPTConfig.n_experts; Mixtral's, Qwen3-MoE's; with --mlp swiglu or geglu). Default: a dense "
                        "MLP (0), or what --init's model has")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="how many experts each token goes through (GPTConfig.experts_per_token, the router's top "
                        "k; default 2, or what --init's model has)")
    p.add_argument("--moe-layers", type=window_layers_arg, default=None, metavar="all|odd|I,J,...",
                   help="the layers whose MLP is the mixture of --n-experts (GPTConfig.moe_layers; Qwen2-MoE's and "
                        "Qwen3-MoE's mlp_only_layers and decoder_sparse_step, DeepSeek's first_k_dense_replace k as "
                        "k,...,n_layer-1); the others a dense MLP of --moe-dense-hidden. Default: all, or what "
                        "--init's model has")
    p.add_argument("--moe-dense-hidden", type=int, default=None, metavar="N",
                   help="the hidden size of the dense layers --moe-layers leaves out (GPTConfig.moe_dense_hidden; "
                        "Qwen2-MoE's intermediate_size); needed with --moe-layers other than all")
    p.add_argument("--moe-aux-loss", type=float, default=None, metavar="COEF",
                   help="add COEF times the routers' load-balancing loss (Switch Transformer's, transformers' "
                        "load_balancing_loss_func; Mixtral trains with 0.02) to the training loss "
                        "(GPTConfig.moe_aux_loss; a mixture-of-experts model only; default: none, or what --init's "
                        "model has)")
    d.add_argument("--document-mask", action="store_true",
                   help="keep the documents of a training window apart: each token attends to its own document "
                        "only (split at <|endoftext|>, which opens each document), and positions count from its "
                        "start (Llama 3's document masking; GPT-2 and nanoGPT let a window run across documents); "
                        "eval scores such a run the same way")
    add_lm_loss_args(p)
    add_distill_args(p)
    e = p.add_argument_group("evaluation")
    e.add_argument("--hellaswag", type=int, default=0, metavar="N",
                   help="at each evaluation also score the first N HellaSwag validation examples (acc and "
                        "acc_norm into metrics.jsonl and hellaswag.png, as build-nanogpt tracks it; the file is "
                        "downloaded once, before training; 10042 is all of them; under torchrun each rank scores "
                        "its share; default 0: off)")
    e.add_argument("--hellaswag-data", default=None,
                   help="the HellaSwag .jsonl to read instead of downloading it, or another multiple-choice file "
                        "`hellaswag --data` reads (ARC, OpenBookQA, PIQA, MMLU, WinoGrande) (with --hellaswag)")
    s = p.add_argument_group("samples")
    s.add_argument("--prompt", default=SAMPLE_DEFAULTS["prompt"], help="prompt for the samples printed while training "
                   "(no trailing space: BPE tokens carry their leading space)")
    s.add_argument("--sample-tokens", type=int, default=60, help="tokens per sample (default %(default)s)")
    s.add_argument("--temperature", type=float, default=SAMPLE_DEFAULTS["temperature"],
                   help="the samples' temperature (default %(default)s); 0 = greedy")
    s.add_argument("--top-k", type=int, default=SAMPLE_DEFAULTS["top_k"],
                   help="the samples draw among the k likeliest tokens only (default %(default)s)")
    add_train_args(p, **DEFAULTS)
    return p


class DataArg(argparse.Action):
    """--data repeated: one value stays a string (the run and its record as before mixtures), several make a list."""

    def __call__(self, parser, namespace, value, option_string=None):
        have = getattr(namespace, self.dest)
        setattr(namespace, self.dest, value if have is None else (have if isinstance(have, list) else [have]) + [value])


def mixture_sources(args) -> list | None:
    """The sources of a mixture (several --data), or None for one source (today's single-corpus path)."""
    return args.data if isinstance(args.data, list) else None


def _source_key(source):
    """What a --data names, to compare two of them: the corpus's name, a folder resolved (a link to it is it), or a
    file by its own name in its resolved folder (data/x.txt and ./data/x.txt are one file). Not a file resolved: two
    Hub snapshot files of equal bytes are links to one blob, two files that `datasets` reads each of (a link and
    its target are one file all the same: check_repeated_sources finds the link's chain reaching the target)."""
    from tritongpt.train.data import named_corpus

    if named_corpus(source):
        return str(source or "pydoc")
    path = Path(str(source)).expanduser().absolute()
    return path.resolve() if path.is_dir() else path.parent.resolve() / path.name


def _read_by_both(a, b) -> set:
    """The names of files two sources both read (data.files_read's {name: (path, hops)}): one name read by both,
    or a name one reads that a link of the other passes through (a link and its target, both given). Names whose
    link chains only meet beyond them (two Hub snapshot files of one blob, two hard links) are two files, each read
    by `datasets` (it reads every file it is given, by name) and here too."""
    if not a or not b:
        return set()

    def reached(reads):  # every name a link of these sources passes through
        return set().union(*(hops for _, hops in reads.values()))

    shared = (a.keys() & b.keys()) | (a.keys() & reached(b)) | (b.keys() & reached(a))
    # A case-insensitive filesystem (macOS's and Windows' default) takes data/a.txt and Data/a.txt for one name, as
    # realpath leaves a spelling be: names equal but for case are one where they are one file (the (device, inode)
    # check this replaced caught them). Two such names on a case-sensitive one are hard links: one too, a rare case.
    for ours, theirs in ((a.keys(), b.keys() | reached(b)), (reached(a), b.keys())):
        ours, theirs = ours - shared, theirs - shared
        alike = {n.lower() for n in ours} & {n.lower() for n in theirs}  # (mostly none: no stat at all)
        for name in (n for n in ours if n.lower() in alike):
            for other in (n for n in theirs if n.lower() == name.lower()):
                try:
                    if os.path.samefile(name, other):
                        shared.add(name)
                except OSError:  # (gone since it was listed: the reading names it)
                    pass
    return shared


def check_repeated_sources(sources, given=None, resume=None):
    """A source given twice in a mixture (the same path however spelt), or two that read one file (a file inside a
    folder also given, a folder's link to a file also given, a .py file the stdlib corpus reads) would be read twice
    and drawn from twice as often, without a word: refused, naming both. What a source reads is what prepare_tokens
    reads (data.files_read): a .jsonl inside a text folder, or a subfolder of a folder of token shards, is not read
    by the folder; two names of one stored file where neither names the other (Hub snapshot files sharing a blob,
    hard links) are two files, each read (_read_by_both). given: the --data values as typed (a Hub dataset id, where
    sources holds the folder it was fetched into); resume: --resume's value, said in the refusal (a run started with
    a repeat, before this check, is resumed with it dropped)."""
    from tritongpt.train import data

    given = list(sources if given is None else given)

    def named(k):  # what the user typed, and for a Hub dataset id where its files lie
        return f"{given[k]}" if str(given[k]) == str(sources[k]) else f"{given[k]} (its files in {sources[k]})"

    # (the refusal alone would send a --resume back to the data the checkpoint recorded, repeat and all: say how
    # to go on, and that the resume's note on other data is expected)
    then = " --resume: a run started with the repeat goes on without it: drop it, with --data-weights to keep each " \
           "source's share as drawn so far (the resume notes the changed data)" if resume else ""
    keys = [_source_key(s) for s in sources]
    # (the stdlib corpus's files are found by reading it, as prepare_tokens then reads it again: only where another
    # source reads a file in the standard library's folder, not at every start of --data stdlib --data pydoc)
    reads = [None if s == "stdlib" else data.files_read(s) for s in sources]
    if "stdlib" in sources and any(data.reads_in_stdlib(r) for r in reads):
        reads = [data.files_read(s) if s == "stdlib" else r for s, r in zip(sources, reads)]
    for j, b in enumerate(keys):
        for i, a in enumerate(keys[:j]):
            where = f"sources {i + 1} and {j + 1} of the mixture"  # (numbered in the order the two are named)
            if a == b:
                if str(given[i]) != str(given[j]):  # (aaa.txt and ./aaa.txt; owner/name and owner/name/default)
                    where += f", as {given[i]} and {given[j]}"
                raise UserError(f"--data {named(j)} is given twice ({where}): it would be read twice, drawn from "
                                f"twice as often; give it once (--data-weights gives a source more weight).{then}")
            shared = _read_by_both(reads[i], reads[j])
            if not shared:
                continue
            one = min(shared)  # (the name both reach: the file itself, or the file a link of one names)
            # Where a source lies is its own name in its folder, resolved: a link beside the folder to one of its
            # files lies outside it (it was said to lie inside), a Hub dataset folder's shard, a link to a blob of
            # the Hub cache, inside it (said to lie elsewhere). The stdlib corpus reads files, pydoc none.
            at = [Path(str(s)).expanduser().absolute() for s in sources]
            at = [a.parent.resolve() / a.name for a in at]
            nested = [(o, n) for o, n in ((i, j), (j, i))
                      if isinstance(keys[o], Path) and keys[o].is_dir() and at[n].is_relative_to(keys[o])]
            stdlib = [(o, n) for o, n in ((i, j), (j, i)) if keys[o] == "stdlib"]
            if stdlib:  # (the other is a path: two stdlib sources are given twice, above)
                corpus, other = stdlib[0]
                said = f"--data {named(other)} (sources {other + 1} and {corpus + 1} of the mixture) reads {one}, " \
                       "a file the standard library corpus (--data stdlib) reads already"
            elif nested:
                outer, inner = nested[0]
                said = f"--data {named(inner)} lies inside the folder --data {named(outer)} (sources {inner + 1} " \
                       f"and {outer + 1} of the mixture), which reads it already"
            else:
                said = f"--data {named(i)} and --data {named(j)} ({where}) both read {one}"
            raise UserError(f"{said}: it would be drawn from twice as often; give one of them (--data-weights gives "
                            f"a source more weight).{then}")


def check_mixture(args):
    """A source given twice, and --data-weights' own errors, before any slow work: one finite weight >= 0 per
    --data, not all 0."""
    sources, weights = mixture_sources(args), getattr(args, "data_weights", None)
    if sources is not None:
        # (the values as typed: cli.fetch_hub_repos puts a Hub dataset id's folder in --data)
        check_repeated_sources(sources, getattr(args, "data_given", None), getattr(args, "resume", None))
    if weights is None:
        return
    if sources is None:
        raise UserError("--data-weights weighs the sources of a mixture: pass several --data (one weight each)")
    if len(weights) != len(sources):
        raise UserError(f"--data-weights: {len(weights)} weight{'s' * (len(weights) != 1)} for {len(sources)} --data "
                        "sources (one each, in their order)")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise UserError(f"--data-weights must be finite numbers >= 0, got {w:g}")
    if not any(weights):
        raise UserError("--data-weights are all 0: no source to draw a batch from")


def parse_args(argv=None) -> argparse.Namespace:
    """The pretrain options on their own (for the Python API and tests): parse_args(["--max-steps", "5"])."""
    return add_args(argparse.ArgumentParser(prog="tritongpt pretrain")).parse_args(argv)


def model_vocab(model_name: str, tokenizer, preset_vocab: int) -> int:
    """The tokenizer's vocabulary, except that GPT-2 and GPT-Neo presets keep 50257 with the GPT-2 tokenizer."""
    if model_name.startswith(("gpt2", "gpt-neo")) and tokenizer.name == "gpt2" and tokenizer.vocab_size <= preset_vocab:
        return preset_vocab
    return tokenizer.vocab_size


def recorded_source(source) -> str:
    """A --data as the run records it: a path as an absolute one (eval finds the run's data from any folder; as
    given, it was looked for relative to wherever eval ran), 'pydoc' for the embedded corpus."""
    if source not in (None, "pydoc", "stdlib") and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return str(source or "pydoc")


class DataPosition:
    """Windows are random, so the position is the batch generator (saved by the Trainer); this
    records which token stream it indexes, to warn when a resume uses other data."""

    def __init__(self, args, tok, block, splits):
        self.source = recorded_source(args.data)
        self.text_field, self.tok, self.block, self.splits = args.text_field, tok, block, splits
        self.document_mask = args.document_mask

    def state_dict(self):
        # document_mask: eval scores the run's windows as it trained on them
        return {"source": self.source, "text_field": self.text_field, "train_tokens": len(self.splits["train"]),
                "block_size": self.block, "tokenizer_hash": self.tok.hash, "source_hash": self.splits["source_hash"],
                "document_mask": self.document_mask, "bos_id": self.splits["bos_id"]}

    def load_state_dict(self, d):
        # checkpoints from before source_hash was recorded are compared without it, and
        # those from before documents were hashed apart by the joined text's hash
        mine = self.splits["source_hash"]
        same_source = d.get("source_hash", mine) in (mine, self.splits["joined_hash"]) and "sources" not in d
        # bos_id: checkpoints from before it was recorded were trained without one
        theirs = (d.get("train_tokens"), d.get("tokenizer_hash"), d.get("block_size"), d.get("bos_id"))
        if theirs != (len(self.splits["train"]), self.tok.hash, self.block, self.splits["bos_id"]) or not same_source:
            note(f"resuming on different data than the checkpoint's ({d.get('source')}, "
                 f"{d.get('train_tokens')} tokens, block {d.get('block_size')}): batches will differ")


class MixturePosition:
    """DataPosition for several --data: each source's record (path, hash, training tokens, BOS) and the weights,
    so that a resume on other sources is named; other weights are named as a changed run arg (--data-weights)."""

    def __init__(self, args, tok, block, splits):
        self.sources = [recorded_source(s) for s in mixture_sources(args)]
        self.text_field, self.tok, self.block, self.splits = args.text_field, tok, block, splits
        self.document_mask = args.document_mask

    def state_dict(self):
        # no "source": eval finds no single corpus of the run to score (it names the mixture instead)
        parts = self.splits["sources"]
        return {"sources": [{"source": s, "name": p["name"], "train_tokens": len(p["train"]),
                             "source_hash": p["source_hash"], "bos_id": p["bos_id"]}
                            for s, p in zip(self.sources, parts)],
                "weights": self.splits["weights"], "text_field": self.text_field,
                "train_tokens": split_tokens(self.splits, "train"), "block_size": self.block,
                "tokenizer_hash": self.tok.hash, "document_mask": self.document_mask}

    def load_state_dict(self, d):
        theirs = [(s.get("train_tokens"), s.get("source_hash"), s.get("bos_id")) for s in d.get("sources", [])]
        mine = [(len(p["train"]), p["source_hash"], p["bos_id"]) for p in self.splits["sources"]]
        if theirs != mine or (d.get("tokenizer_hash"), d.get("block_size")) != (self.tok.hash, self.block):
            was = ", ".join(str(s.get("source")) for s in d["sources"]) if "sources" in d else d.get("source")
            note(f"resuming on different data than the checkpoint's ({was}, {d.get('train_tokens')} tokens, block "
                 f"{d.get('block_size')}): batches will differ")


NO_WINDOW = "--window-layers {} picks the layers --attention-window makes local: without a window it does nothing"
NO_ROPE = "--rope-theta {:g} is RoPE's base: without --position-encoding rope (its own or --init's) it does nothing"
NO_SWIGLU = ("--mlp-hidden {} is the SwiGLU, GeGLU or squared-ReLU MLP's hidden size: without --mlp swiglu, geglu or "
             "relu2 it does nothing")
NO_EXPERTS = ("--experts-per-token {} is how many experts a token goes through: without --n-experts (its own or "
              "--init's) the MLP is dense and it does nothing")
NO_MOE_LAYERS = ("{} picks which layers are a mixture of experts: without --n-experts (its own or --init's) every "
                 "MLP is dense and it does nothing")


def moe_layers_given(args) -> str | None:
    """--moe-layers and --moe-dense-hidden as given, for NO_MOE_LAYERS; None when neither is."""
    given = [f"--{k.replace('_', '-')} {v}" for k in ("moe_layers", "moe_dense_hidden")
             if (v := getattr(args, k, None)) is not None]
    return " ".join(given) or None


def check_args(args, targs):
    """The flags' own errors, before any slow work, then the model: -> (model, tokenizer, block size,
    prompt ids). The model is --init's weights, or the preset's random ones (seeded by --seed)."""
    from tritongpt._types import softcap_value
    from tritongpt.commands import vocab_multiple
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train import common, data
    from tritongpt.train.formats import with_bos
    from tritongpt.train.generate import check_sampling
    from tritongpt.train.sft import load_init_model, pick_tokenizer
    from tritongpt.train.tokenizer import get_tokenizer

    targs.validate()
    if targs.resume:  # the Trainer checks it too, but after the data is tokenized (minutes for a large corpus)
        ckpt = common.resume_checkpoint(targs.out_dir, targs.resume)
        common.check_resume_of(ckpt, common.load_state(ckpt, mmap=True), "pretrain")
    # an unknown model: a UserError before any slow work
    preset = get_config(args.model or "tiny") if args.init is None else None
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    for flag in ("logit_softcap", "attn_softcap"):
        if getattr(args, flag) is not None:
            try:
                softcap_value(getattr(args, flag), "--" + flag.replace("_", "-"))
            except ValueError as e:
                raise UserError(str(e)) from None
    if args.logit_scale is not None and not (math.isfinite(args.logit_scale) and args.logit_scale > 0):
        raise UserError(f"--logit-scale must be a finite number > 0 (1: unscaled logits), got {args.logit_scale}")
    for flag in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.attention_window is not None and args.attention_window < 0:
        raise UserError(f"--attention-window must be >= 0 (0: every layer sees the whole context), "
                        f"got {args.attention_window}")
    if args.window_layers is not None and args.init is None and not args.attention_window:
        raise UserError(NO_WINDOW.format(args.window_layers))
    if args.rope_theta is not None:
        if not math.isfinite(args.rope_theta) or args.rope_theta <= 0:
            raise UserError(f"--rope-theta must be a finite number > 0, got {args.rope_theta:g}")
        if args.init is None and args.position_encoding != "rope":
            raise UserError(NO_ROPE.format(args.rope_theta))
    if args.n_kv_head is not None and args.n_kv_head < 0:
        raise UserError(f"--n-kv-head must be >= 0 (0: as many as the heads), got {args.n_kv_head}")
    if args.n_kv_head and preset is not None and preset.n_head % args.n_kv_head:
        raise UserError(f"--n-kv-head {args.n_kv_head} must divide {args.model or 'tiny'}'s {preset.n_head} heads")
    if args.mlp_hidden is not None:
        if args.mlp_hidden <= 0:
            raise UserError(f"--mlp-hidden must be a positive integer, got {args.mlp_hidden}")
        if args.init is None and args.mlp not in GATED_MLPS + ("relu2",):
            raise UserError(NO_SWIGLU.format(args.mlp_hidden))
    # (GPTConfig keeps experts_per_token on a dense model, as Hugging Face configs do: the flag alone trained a
    # dense model without a word)
    if args.experts_per_token is not None and args.init is None and not args.n_experts:
        raise UserError(NO_EXPERTS.format(args.experts_per_token))
    if moe_layers_given(args) and args.init is None and not args.n_experts:
        raise UserError(NO_MOE_LAYERS.format(moe_layers_given(args)))
    check_mixture(args)
    for source in mixture_sources(args) or [args.data]:
        data.check_text_field(source, args.text_field)
        if Path(str(source or "")).suffix == ".json":
            note(f"{source} is read as plain text, brackets and keys included (JSON records "
                 "are read from .jsonl files, one object per line)")
    check_sampling(args.temperature, args.top_k, flags=True)  # not at the first sample, steps later
    if args.sample_tokens < 0:  # it turned the samples off, as 0 does, without a word
        raise UserError(f"--sample-tokens must be >= 0 (0: no samples), got {args.sample_tokens}")
    given = [f"--{k.replace('_', '-')}" for k, v in SAMPLE_DEFAULTS.items() if getattr(args, k) != v]
    if args.sample_tokens == 0 and given:
        raise UserError(f"{given[0]} sets the samples printed while training, which --sample-tokens 0 turns off: "
                        "pass one of them")
    # a bad flag or file, or no network: now, not at the first evaluation. Under torchrun only each
    # node's first process downloads the file; the others read it at their first evaluation, past
    # load_splits' barrier, which every process reaches after its node's download
    hellaswag_examples(args, fetch=common.dist_env()[1] == 0)
    vocab_multiple(args)
    refuse_rope_from_gpt2(args)
    refuse_rmsnorm_from_published(args)
    refuse_swiglu_from_gpt2(args)
    common.set_seed(targs.seed)  # the preset's random weights (and --init tiny's)
    if args.init is not None:
        # --model only when given: it names the heads of a GPT-2 file without its config.json
        model = load_init_model(args.init, args.model)
        if args.vocab_multiple > 1:
            model = model.pad_vocab(args.vocab_multiple)
        if args.dropout is not None:
            model.set_dropout(args.dropout)
        if args.window_layers is not None and not (args.attention_window or model.config.attention_window):
            raise UserError(NO_WINDOW.format(args.window_layers))
        if args.rope_theta is not None and (args.position_encoding or model.config.position_encoding) != "rope":
            raise UserError(NO_ROPE.format(args.rope_theta))
        if args.experts_per_token is not None and not (args.n_experts or model.config.n_experts):
            raise UserError(NO_EXPERTS.format(args.experts_per_token))
        if moe_layers_given(args):
            from dataclasses import replace

            c = model.config
            if not c.n_experts:
                raise UserError(NO_MOE_LAYERS.format(moe_layers_given(args)))
            # compared as GPTConfig keeps them ("odd" as its list)
            said = replace(c, **{k: v for k in ("moe_layers", "moe_dense_hidden")
                                 if (v := getattr(args, k)) is not None})
            if (said.moe_layers, said.moe_dense_hidden) != (c.moe_layers, c.moe_dense_hidden):
                raise UserError(f"{moe_layers_given(args)} would change what --init's model computes (its "
                                f"moe_layers is {c.moe_layers!r}, moe_dense_hidden {c.moe_dense_hidden}): leave the "
                                "flag out")
        for field in ("logit_softcap", "logit_scale", "embedding_multiplier", "residual_multiplier",
                      "attention_multiplier", "attn_softcap", "attention_window", "window_layers",
                      "position_encoding", "rope_theta", "norm", "mlp", "nope_layers", "parallel_residual",
                      "gelu_approximate", "rotary_dim", "shared_norm", "head_bias", "embed_norm", "norm_bias",
                      "alibi_scaled", "n_experts", "experts_per_token"):
            given, has = getattr(args, field), getattr(model.config, field)
            if given is not None and given != has:
                show = (lambda v: f"{v:g}") if isinstance(has, float) else str
                raise UserError(f"--{field.replace('_', '-')} {show(given)} would change what --init's model "
                                f"computes (its {field} is {show(has)}): leave the flag out")
        if args.bias is not None and args.bias != model.config.bias:
            c = model.config
            has = "biases" if c.bias else "biases on q/k/v only" if c.qkv_bias_only else "none"
            raise UserError(f"--{'' if args.bias else 'no-'}bias would change the shapes of --init's weights (its "
                            f"linear layers have {has}): leave the flag out")
        if args.n_kv_head is not None and (args.n_kv_head or model.config.n_head) != model.config.kv_heads:
            raise UserError(f"--n-kv-head {args.n_kv_head} would change the shapes of --init's weights (its "
                            f"n_kv_head is {model.config.n_kv_head}, with {model.config.n_head} heads): leave the "
                            "flag out")
        if args.mlp_hidden is not None and (model.config.mlp not in GATED_MLPS + ("relu2",)
                                            or args.mlp_hidden != model.config.ff_hidden):
            has = f"{model.config.mlp} MLP's hidden size is {model.config.ff_hidden}"
            raise UserError(f"--mlp-hidden {args.mlp_hidden} would change the shapes of --init's weights (its "
                            f"{has}): leave the flag out")
        if args.moe_aux_loss is not None:  # a training objective, not the function: --init's may change
            from dataclasses import replace

            model.config.moe_aux_loss = replace(model.config, moe_aux_loss=args.moe_aux_loss).moe_aux_loss
        tok = pick_tokenizer(args.tokenizer, args.init, model.config.vocab_size)
    else:
        tok = get_tokenizer(args.tokenizer or "default")
        name = args.model or "tiny"
        cfg = get_config(name, vocab_size=model_vocab(name, tok, preset.vocab_size),
                         dropout=args.dropout, vocab_multiple=args.vocab_multiple, logit_softcap=args.logit_softcap,
                         logit_scale=args.logit_scale, embedding_multiplier=args.embedding_multiplier,
                         residual_multiplier=args.residual_multiplier, attention_multiplier=args.attention_multiplier,
                         attn_softcap=args.attn_softcap,
                         attention_window=args.attention_window, window_layers=args.window_layers,
                         position_encoding=args.position_encoding, rope_theta=args.rope_theta,
                         nope_layers=args.nope_layers, rotary_dim=args.rotary_dim,
                         parallel_residual=args.parallel_residual,
                         gelu_approximate=args.gelu_approximate, shared_norm=args.shared_norm,
                         head_bias=args.head_bias, embed_norm=args.embed_norm, norm_bias=args.norm_bias,
                         alibi_scaled=args.alibi_scaled,
                         n_experts=args.n_experts,
                         experts_per_token=args.experts_per_token, moe_aux_loss=args.moe_aux_loss,
                         moe_layers=args.moe_layers, moe_dense_hidden=args.moe_dense_hidden,
                         n_kv_head=args.n_kv_head, norm=args.norm, mlp=args.mlp, mlp_hidden=args.mlp_hidden,
                         bias=args.bias)
        model = GPTModel(cfg)
    context = model.config.context_length
    block = context if args.block_size is None else args.block_size
    if block <= 0:
        raise UserError(f"--block-size must be positive, got {block}")
    if block > context:
        raise UserError(f"--block-size {block} is longer than {model_name(args)}'s context length {context}")
    # a Gemma's or Llama's tokenizer starts every text with BOS, as each document of the data does
    prompt_ids = with_bos(tok, tok.encode(args.prompt, allowed_special="all")) or [tok.eot_id]
    if len(prompt_ids) > context:
        raise UserError(f"--prompt is {len(prompt_ids)} tokens; the context is {context}")
    return model, tok, block, prompt_ids


def refuse_rope_from_gpt2(args):
    """--init gpt2-small (a name: the published weights) with --position-encoding rope or --rope-theta:
    refused before the download. GPT-2's weights are trained with learned position embeddings (wpe),
    which a RoPE model has none of; its attention expects them in the residual stream."""
    from tritongpt.train.gpt2_weights import HUB_REPOS

    if args.init not in HUB_REPOS or Path(args.init).expanduser().exists():
        return
    if args.position_encoding in ("rope", "alibi") or args.rope_theta is not None:
        pe = args.position_encoding or "rope"
        flag = f"--position-encoding {pe}" if args.position_encoding else f"--rope-theta {args.rope_theta:g}"
        name = "ALiBi" if pe == "alibi" else "RoPE"
        raise UserError(f"--init {args.init}: GPT-2's weights were trained with learned position embeddings, "
                        f"not {name}: {flag} cannot start from them (leave it out, or train a {name} model without "
                        "--init)")


def refuse_rmsnorm_from_published(args):
    """--init gpt2-small or gpt-neo-125m (a name: the published weights) with --norm rmsnorm: refused
    before the download. Their norms are LayerNorms, whose biases an RMSNorm has no place for."""
    from tritongpt.train import gpt_neo_weights
    from tritongpt.train.gpt2_weights import HUB_REPOS

    published = args.init in HUB_REPOS or args.init in gpt_neo_weights.HUB_REPOS
    if args.norm == "rmsnorm" and published and not Path(args.init).expanduser().exists():
        raise UserError(f"--init {args.init}: its published weights were trained with LayerNorm (a mean and a bias): "
                        "--norm rmsnorm cannot start from them (leave it out, or train an RMSNorm model without "
                        "--init)")


def refuse_swiglu_from_gpt2(args):
    """--init gpt2-small (the published weights) with --mlp swiglu/geglu or --mlp-hidden: refused before the
    download. GPT-2's MLP is fc1, GELU, fc2: its weights have no gate to start a gated MLP from."""
    from tritongpt.train.gpt2_weights import HUB_REPOS

    if args.init not in HUB_REPOS or Path(args.init).expanduser().exists():
        return
    if args.mlp in GATED_MLPS or args.mlp_hidden is not None:
        flag = f"--mlp {args.mlp}" if args.mlp in GATED_MLPS else f"--mlp-hidden {args.mlp_hidden}"
        raise UserError(f"--init {args.init}: GPT-2's weights have a GELU MLP (fc1, fc2), not SwiGLU's gate, up and "
                        f"down: {flag} cannot start from them (leave it out, or train a SwiGLU model without --init)")


def hellaswag_examples(args, fetch: bool = True) -> list | None:
    """--hellaswag's first N examples (read once: later calls return them), [] when it is off.
    fetch=False checks the flags only where the file would be downloaded (None)."""
    from tritongpt.train import hellaswag

    if getattr(args, "_hellaswag", None) is not None:
        return args._hellaswag
    if args.hellaswag < 0:
        raise UserError(f"--hellaswag must be >= 0 (0: off), got {args.hellaswag}")
    if args.hellaswag == 0:
        if args.hellaswag_data is not None:
            raise UserError("--hellaswag-data is read with --hellaswag N (how many examples to score)")
        args._hellaswag = []
        return []
    if args.hellaswag_data is None and not fetch:
        return None
    path = args.hellaswag_data if args.hellaswag_data is not None else hellaswag.download(flag="--hellaswag-data")
    examples = hellaswag.read_examples(path)
    if len(examples) < args.hellaswag:
        note(f"--hellaswag {args.hellaswag}: {path} has {len(examples)} examples; scoring all of them")
    args._hellaswag = examples[:args.hellaswag]
    return args._hellaswag


def hellaswag_eval_fn(examples, tok):
    """A shared_eval_fn (train/loop.py): HellaSwag's acc and acc_norm on `examples` (a list, or a
    function that gives it, called at the first evaluation), each rank scoring its share (under
    the Trainer's autocast)."""
    from tritongpt.train import hellaswag

    def run(model, rank, world_size):
        got = examples() if callable(examples) else examples
        result = hellaswag.score(model, tok, got, rank=rank, world_size=world_size)
        # WinoGrande's options share their ending: acc alone (score gives no acc_norm)
        return {f"hellaswag_{k}": result[k] for k in ("acc", "acc_norm") if k in result}

    return run


def model_name(args) -> str:
    return f"--init {args.init}" if args.init is not None else args.model or "tiny"


def load_splits(args, tok, block, batch_size, trainer) -> dict:
    """Tokenise (or find cached) the corpus and check it holds a batch: -> the splits' token arrays,
    "eval" naming the one evaluations read, and the data's hashes."""
    from tritongpt.train import data

    # under torchrun, rank 0 tokenises (and caches) first; the others then read its cache
    if trainer.ddp and not trainer.is_main:
        torch.distributed.barrier()
    source = args.data if args.text_field == "text" else {"source": args.data, "text_field": args.text_field}
    tokens = data.prepare_tokens(source, tok, args.cache_dir, val_fraction=args.val_fraction)
    if trainer.ddp and trainer.is_main:
        torch.distributed.barrier()
    n_train, n_val = len(tokens.train), len(tokens.val)
    where = args.data or "the pydoc corpus"
    if n_train < block + 1:
        raise UserError(f"context longer than the data: --block-size {block} needs at least {block + 1} "
                        f"training tokens but {where} has {n_train}; use a smaller --block-size or more text")
    if batch_size * block > n_train:
        raise UserError(f"a batch of {batch_size} x {block} tokens is larger than the training data "
                        f"({n_train} tokens in {where}); lower --batch-size or --block-size")
    if n_val < block + 1 and trainer.is_main:
        note(f"the validation split ({n_val} tokens) is shorter than one block of {block}: "
             "evaluating on training windows")
    return dict(train=tokens.train, val=tokens.val, eval="val" if n_val >= block + 1 else "train",
                source_hash=tokens.meta["source_hash"], joined_hash=tokens.meta.get("joined_hash"),
                bos_id=tokens.meta.get("bos_id"))


def load_mixture(args, tok, block, batch_size, trainer) -> dict:
    """load_splits for several --data: each source tokenised (or found cached) and split on its own, and checked
    to hold a block -> {"sources": [its splits, as load_splits gives one source's, and its name], "weights": the
    normalised --data-weights (default: each source's share of the training tokens)}."""
    from tritongpt.train import data

    sources = mixture_sources(args)
    names = data.source_names(sources)
    if trainer.ddp and not trainer.is_main:
        torch.distributed.barrier()
    made = []
    for source, name in zip(sources, names):
        # a --cache-dir is one source's folder (tokens.bin, tokens.json): each source its own inside it
        cache = None if args.cache_dir is None else Path(args.cache_dir) / name
        src = source if args.text_field == "text" else {"source": source, "text_field": args.text_field}
        made.append(data.prepare_tokens(src, tok, cache, val_fraction=args.val_fraction))
    if trainer.ddp and trainer.is_main:
        torch.distributed.barrier()
    parts = []
    for source, name, tokens in zip(sources, names, made):
        n_train, n_val = len(tokens.train), len(tokens.val)
        if n_train < block + 1:  # its windows are drawn within it alone: it must hold one
            raise UserError(f"--data {source}: a block of {block} tokens needs at least {block + 1} training tokens "
                            f"but it has {n_train}; use a smaller --block-size, or more text in it, or leave it out")
        if n_val < block + 1 and trainer.is_main:
            note(f"--data {source}: its validation split ({n_val} tokens) is shorter than one block of {block}: "
                 "evaluating it on its training windows")
        parts.append(dict(name=name, source=source, train=tokens.train, val=tokens.val,
                          eval="val" if n_val >= block + 1 else "train", source_hash=tokens.meta["source_hash"],
                          joined_hash=tokens.meta.get("joined_hash"), bos_id=tokens.meta.get("bos_id")))
    n_train = sum(len(p["train"]) for p in parts)
    if batch_size * block > n_train:
        raise UserError(f"a batch of {batch_size} x {block} tokens is larger than the training data "
                        f"({n_train} tokens in {len(parts)} sources); lower --batch-size or --block-size")
    return dict(sources=parts, weights=mixture_shares(args.data_weights or [len(p["train"]) for p in parts]))


def mixture_shares(weights) -> list:
    """The weights normalised to sum to 1 (what a mixture records and draws by)."""
    if not math.isfinite(sum(weights)):  # finite weights near 1e308: their sum overflows, and every share were 0
        weights = [w / max(weights) for w in weights]
    return [w / sum(weights) for w in weights]


def split_tokens(splits, split) -> int:
    """The tokens of a split ("train", "val"), of every source of a mixture together."""
    return sum(len(p[split]) for p in splits["sources"]) if "sources" in splits else len(splits[split])


# Muennighoff et al. 2023 (Scaling Data-Constrained Language Models): up to ~4 epochs of repeated data are about
# as good as new data; past that each repetition is worth less
MANY_EPOCHS = 4


def print_mixture(args, targs, tok, block, splits, trainer):
    """The header's data lines of a mixture: each source's tokens, weight, and epochs over the planned steps (the
    tokens drawn from it, its weight of every step's rows times the block, over its training tokens)."""
    per_step = targs.batch_size * targs.grad_accum * trainer.world_size
    parts = splits["sources"]
    print(f"data: a mixture of {len(parts)} sources, {split_tokens(splits, 'train'):,} training + "
          f"{split_tokens(splits, 'val'):,} validation tokens ({tok.name} tokenizer); {targs.max_steps} steps x "
          f"{per_step} x {block} tokens, each row from one source"
          f"{', documents kept apart' if args.document_mask else ''}")
    for p, w in zip(parts, splits["weights"]):
        epochs = targs.max_steps * per_step * block * w / len(p["train"])
        many = f" (more than {MANY_EPOCHS}: repeated data is worth less past ~{MANY_EPOCHS} epochs, " \
            "Muennighoff et al. 2023)" if epochs > MANY_EPOCHS else ""
        print(f"  {p['name']}: {p['source']}: {len(p['train']):,} training + {len(p['val']):,} "
              f"validation tokens{', BOS before each document' if p['bos_id'] is not None else ''}, weight {w:.3f}, "
              f"{epochs:.2f} epochs{many}")


def print_header(args, targs, model, tok, block, splits, trainer):
    from tritongpt.train.loop import lm_loss_text

    cfg = model.config
    padded = f" padded to {cfg.padded_vocab_size}" if cfg.padded_vocab_size != cfg.vocab_size else ""
    local = f", local attention over {cfg.attention_window} positions in {cfg.window_layers} layers"
    scaled = f", {cfg.rope_scaling['rope_type']} scaling x{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else ""
    rope = f", RoPE (theta {cfg.rope_theta:g}{scaled})" if cfg.position_encoding == "rope" else \
        (", ALiBi" + " (scaled with the scores)" * cfg.alibi_scaled) * (cfg.position_encoding == "alibi")
    gqa = f", {cfg.kv_heads} key/value head{'s' * (cfg.kv_heads > 1)} for {cfg.n_head} query heads" \
        if cfg.kv_heads < cfg.n_head else ""
    gqa += f", heads of {cfg.head_dim}" if cfg.attention_head_dim else ""
    gqa += (", q/k norms over all heads" if cfg.qk_norm_width == "all" else ", q/k norms") if cfg.qk_norm else ""
    gqa += ", RMSNorm" if cfg.norm == "rmsnorm" else ""
    gqa += f", {'SwiGLU' if cfg.mlp == 'swiglu' else 'GeGLU'} MLP (hidden {cfg.ff_hidden})" if cfg.mlp in GATED_MLPS \
        else ""
    gqa += f", squared-ReLU MLP (hidden {cfg.ff_hidden})" if cfg.mlp == "relu2" else ""
    gqa += ", embeddings scaled by sqrt(n_embd)" if cfg.scale_embeddings else ""
    gqa += f", embeddings times {cfg.embedding_multiplier:g}" if cfg.embedding_multiplier != 1 else ""
    gqa += f", sublayer outputs times {cfg.residual_multiplier:g}" if cfg.residual_multiplier != 1 else ""
    gqa += f", attention scores scaled by {cfg.attention_multiplier:g}" if cfg.attention_multiplier else ""
    gqa += (", sandwich norms" if cfg.pre_norms else ", norms after each sublayer only") if cfg.post_norms else ""
    gqa += f", local layers' RoPE theta {cfg.rope_local_theta:g}" if cfg.rope_local_theta else ""
    gqa += f", attention scores soft-capped at {cfg.attn_softcap:g}" if cfg.attn_softcap else ""
    gqa += f", no RoPE in layers {cfg.nope_layers}" if cfg.nope_layers else ""
    gqa += f", RoPE on {cfg.rotary_dim} of each head's {cfg.head_dim} dimensions" if cfg.rotary_dim else ""
    gqa += f", attention scaled by 1/sqrt({cfg.attention_scale_width})" if cfg.attention_scale_width else ""
    gqa += (", attention and MLP in parallel" + (" on one norm" if cfg.shared_norm else "")) \
        if cfg.parallel_residual else ""
    gqa += ", LM-head bias" if cfg.head_bias else ""
    gqa += ", a norm on the embeddings" if cfg.embed_norm else ""
    gqa += ", LayerNorms without biases" if not cfg.norm_bias else ""
    gqa += ", exact (erf) GELU" if cfg.gelu_approximate == "none" else ""
    # gpt-oss's touches (attention_sinks, moe_bias, moe_activation): said as every other architecture field is, so
    # the header tells a GPT-OSS-shaped model from a Mixtral-shaped one
    gqa += ", attention sinks" if cfg.attention_sinks else ""
    renorm = ", renormalized" if cfg.moe_norm_topk else ""
    aux = f", load-balancing loss x{cfg.moe_aux_loss:g}" if cfg.moe_aux_loss else ""
    biased = ", with biases" if cfg.moe_bias else ""
    clamped = f", clamped SwiGLU (limit {cfg.swiglu_limit:g}, alpha {cfg.swiglu_alpha:g})" \
        if cfg.moe_activation == "gpt_oss" else ""
    where = "" if cfg.moe_layers == "all" else f" in layers {cfg.moe_layers} (the others dense, {cfg.moe_dense_hidden})"
    gqa += f", {cfg.n_experts} experts{where} (top {cfg.experts_per_token}{renorm}{biased}{clamped}{aux})" \
        if cfg.n_experts else ""
    print(f"pretrain: {model_name(args)} ({model.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size}{padded}, "
          f"context {cfg.context_length}"
          f"{f', trained on {block}-token blocks' if block != cfg.context_length else ''}"
          f"{f', logits soft-capped at {cfg.logit_softcap:g}' if cfg.logit_softcap else ''}"
          f"{f', logits scaled by {cfg.logit_scale:g}' if cfg.logit_scale != 1 else ''}"
          f"{local if cfg.attention_window else ''}"
          f"{', attention scores unscaled' if not cfg.scale_attention else ''}"
          f"{', no q/k/v biases' if cfg.bias and not cfg.qkv_bias else ''}"
          f"{', biases on q/k/v only' if cfg.qkv_bias_only else ''}{rope}{gqa}) "
          f"on {trainer.device} ({str(trainer.dtype).replace('torch.', '')}, kernels {cfg.kernels}"
          f"{', ' + str(trainer.world_size) + ' processes' if trainer.ddp else ''})")
    per_step = targs.batch_size * targs.grad_accum * trainer.world_size
    if "sources" in splits:
        print_mixture(args, targs, tok, block, splits, trainer)
    else:
        n_train, n_val = len(splits["train"]), len(splits["val"])
        print(f"data: {args.data or 'the pydoc corpus'}: {n_train:,} training + {n_val:,} validation tokens "
              f"({tok.name} tokenizer{', BOS before each document' if splits['bos_id'] is not None else ''}); "
              f"{targs.max_steps} steps x {per_step} x {block} tokens"
              f"{', documents kept apart' if args.document_mask else ''}")
    options = lm_loss_text(vars(args))
    if options:  # the logged train loss is then the objective, not the cross-entropy val_loss reports
        print(f"loss: cross-entropy with {options} (train loss; val loss is the plain cross-entropy)")


def pretrain(args) -> dict:
    """Run the pretraining job described by `args` (a Namespace from parse_args / the CLI).

    Returns the Trainer's final dict plus first_val_loss, n_params, train_tokens, val_tokens.
    """
    from tritongpt.train import common, data, distill
    from tritongpt.train.generate import generate
    from tritongpt.train.loop import TrainArgs, Trainer, lm_loss_options, loss_eval_fn
    from tritongpt.train.tokenizer import RUN_TOKENIZER, save_run_tokenizer

    targs = TrainArgs.from_namespace(args)
    options = lm_loss_options(args)
    distill_options = distill.distill_options(args)  # recorded without a teacher too: a resume names a change
    model, tok, block, prompt_ids = check_args(args, targs)
    teacher = None if args.teacher is None else distill.load_teacher(
        args.teacher, tok, block, f"--init {args.init}" if args.init else f"--tokenizer {args.tokenizer or 'default'}",
        args.teacher_quantize, args.teacher_group_size)
    splits = {}  # filled once the Trainer has set up the processes (rank 0 tokenises first)
    mixture = mixture_sources(args)

    def get_batch(split, generator):
        if mixture is not None:  # "eval": each source's evaluation split (its val, or train where val is short)
            arrays = [p[p["eval"] if split == "eval" else split] for p in splits["sources"]]
            return data.get_mixture_batch(arrays, splits["weights"], targs.batch_size, block, generator, trainer.device)
        return data.get_batch(splits[split], targs.batch_size, block, generator, trainer.device)

    def get_eval_batch(split, generator):
        return get_batch("eval" if mixture is not None else splits["eval"], generator)

    def source_eval_batch(i):
        """Source i's evaluation batches alone (val_loss_<name>): the windows one --data of it would score."""
        def get(split, generator):
            p = splits["sources"][i]
            x, y = data.get_batch(p[p["eval"]], targs.batch_size, block, generator, trainer.device)
            return x, y, torch.full((len(x),), i, device=x.device)

        return get

    def doc_ids_of(x, src=None):
        if not args.document_mask:
            return None
        if src is not None:  # a mixture's rows, each split at its own source's marker
            return data.document_ids_of_rows(x, src, tok.eot_id, [p["bos_id"] for p in splits["sources"]])
        return data.document_ids(x, tok.eot_id, splits["bos_id"])

    def loss_fn(m, batch, **options):
        x, y, *src = batch  # a mixture's batches: each row's source too
        # the model computes its loss: the toggle covers the loss kernel too. A mixture of experts' load-balancing
        # loss is forward's, over its own micro-batch: under --grad-accum k the step trains on the mean of the k
        # micro-batches' aux, not the aux of their tokens together (E * sum f_e P_e, a product of two means, is
        # not linear in the tokens). Left so: it is what transformers' Trainer does (an aux per forward), k
        # equal windows weigh alike, and the whole batch's would need every micro-batch's routing first
        return m(x, targets=y, doc_ids=doc_ids_of(x, *src), **options)

    def objective(m, batch):
        return loss_fn(m, batch, **options)

    # the objective; evaluations score the plain loss_fn. A teacher's run logs its loss's two parts
    parts = distill.Parts()
    train_loss_fn = objective if teacher is None else \
        distill.pretrain_loss_fn(teacher, distill_options, tok.vocab_size, doc_ids_of, parts, **options)

    def sample_fn(m):
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=trainer.device)
        gen = torch.Generator(device=trainer.device).manual_seed(targs.seed)
        out = generate(m, idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                       generator=gen)  # KV cache on
        row = out[0].tolist()
        return tok.decode(row[1:] if row[0] == data.document_bos(tok) else row)  # the BOS not printed, as generate

    eval_fn = loss_eval_fn(loss_fn, get_eval_batch, targs.eval_batches, seed=targs.seed + 10_000)
    run_args = {"init": common.data_path(args.init), "document_mask": args.document_mask, **options,
                **distill_options}
    if mixture is not None:
        # besides the combined val_loss, each source alone (the same seed: the batches its own run would score)
        evals = [eval_fn] + [loss_eval_fn(loss_fn, source_eval_batch(i), targs.eval_batches, seed=targs.seed + 10_000,
                                          key=f"val_loss_{name}") for i, name in enumerate(data.source_names(mixture))]

        def eval_fn(m):
            return {k: v for f in evals for k, v in f(m).items()}

        # recorded where one --data records nothing new: a resume on other sources or weights names them
        given = args.data_weights and mixture_shares(args.data_weights)
        run_args.update(data=[common.data_path(s) or "pydoc" for s in mixture], data_weights=given or None)
    shared = hellaswag_eval_fn(lambda: hellaswag_examples(args), tok) if args.hellaswag else None
    position = (DataPosition if mixture is None else MixturePosition)(args, tok, block, splits)
    if teacher is not None:  # its fingerprint saved with the data position, compared on --resume
        position = distill.WithTeacher(position, teacher, args.teacher)
    trainer = Trainer(model, targs, train_loss_fn, get_batch, eval_fn=eval_fn, shared_eval_fn=shared,
                      sample_fn=sample_fn if args.sample_tokens > 0 else None,
                      name="pretrain", data_state=position,
                      run_args=run_args,
                      step_metrics=parts.pop if teacher is not None else None, run_defaults=distill.RUN_DEFAULTS)
    if teacher is not None:
        distill.place_teacher(teacher, trainer)
    try:
        splits.update((load_splits if mixture is None else load_mixture)(args, tok, block, targs.batch_size, trainer))
        if mixture is not None:  # the weights as drawn (normalised; the default's from the tokens), for a resume
            trainer.run_args["data_weights"] = splits["weights"]
    except BaseException:
        trainer.close()
        raise
    if trainer.is_main:
        Path(targs.out_dir).mkdir(parents=True, exist_ok=True)
        save_run_tokenizer(tok, Path(targs.out_dir))
        print_header(args, targs, model, tok, block, splits, trainer)
    result = trainer.fit()
    if trainer.is_main and hellaswag_examples(args):
        common.plot_curves(trainer.metrics.rows(), Path(targs.out_dir) / "hellaswag.png",
                           keys=("hellaswag_acc_norm", "hellaswag_acc"), title="HellaSwag")
    # this call's evaluations, as first_loss is this call's first step (a resume's first is the
    # checkpoint's, not step 0's); one evaluation (--eval-every 0: the last step's) has no first
    # to compare with, and printed as both ends it read "val loss 7.77 -> 7.77"
    start = result["step"] - len(result["losses"])
    vals = [r["val_loss"] for r in trainer.metrics.rows() if "val_loss" in r and r.get("step", 0) >= start]
    result.update(first_val_loss=vals[0] if len(vals) > 1 else None, n_params=model.num_params(),
                  train_tokens=split_tokens(splits, "train"), val_tokens=split_tokens(splits, "val"),
                  tokenizer_path=str(Path(targs.out_dir) / RUN_TOKENIZER))
    return result


def cmd_pretrain(args):
    r = pretrain(args)
    if not r["is_main"]:  # DDP: rank 0 reports
        return 0

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    # a resume's seconds, losses and tokens/s are this call's: so is its count of steps
    ran = len(r["losses"])
    steps = f"{ran} steps" + (f" (to step {r['step']})" if ran != r["step"] else "")
    print(f"done: {steps} in {r['time_s']:.0f} s; "
          f"train loss {fmt(r['first_loss'])} -> {fmt(r['loss'])}, "
          f"val loss {fmt(r['first_val_loss'])} -> {fmt(r.get('val_loss'))}; "
          f"{'-' if r['tok_per_s'] is None else format(r['tok_per_s'], ',.0f')} tok/s")
    print(f"wrote {r['metrics_path']}, {r['plot_path']}, {r['checkpoint']}")
    print(f"try: tritongpt generate --weights {Path(r['checkpoint']).parent} --prompt \"The\"")
    return 0


def add_cli(sub):
    p = sub.add_parser("pretrain", help=command_help("pretrain"),
                       description="Pretrain a GPT on a text corpus (default: the tiny preset on the "
                                   "embedded pydoc corpus).")
    add_args(p)
    p.set_defaults(func=cmd_pretrain)
