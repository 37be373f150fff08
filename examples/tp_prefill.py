"""A long prefill with FlexPrefill in a model sharded over several GPUs (tensor parallel).

    torchrun --nproc-per-node 2 examples/tp_prefill.py                      # Gemma 3 270M, 32k needle prompt
    torchrun --nproc-per-node 2 examples/tp_prefill.py --model random:llama3.1-8b --layers 8 --length 131072

transformers splits every attention layer's heads over the ranks (its own tensor-parallel
plan); the "flexprefill" attention then runs on each rank's heads, unchanged.  Gemma 3 270M has
one key/value head, which cannot be split, so the checkpoint prepared below repeats it once per
rank (an exact rewrite).  ``flexprefill tp-check`` (same options) also checks the result against one
GPU and times dense and sparse prefill; this file is the shortest path to a sharded prefill.
Runs on CPUs too (gloo, float32), slowly.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

from flexprefill import FlexPrefillConfig
from flexprefill.integrations.tensor_parallel import init_distributed
from flexprefill.integrations.transformers import set_default_config
from flexprefill_tools.demo import build_needle_prompt
from flexprefill_tools.models import haystack_text
from flexprefill_tools.tp_check import prepare_packaged_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="gemma3-270m", help="packaged name, HF folder, or random:<arch>")
parser.add_argument("--layers", type=int, default=None, help="layers of a random:<arch> model")
parser.add_argument("--length", type=int, default=None, help="prompt tokens (default: the model's context, 2048 on CPU)")
parser.add_argument("--gamma", type=float, default=0.9)
args = parser.parse_args()

rank, world, device = init_distributed()  # NCCL on GPUs, one rank per GPU
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

# 1. a checkpoint whose key/value heads split over the ranks (written once, by rank 0)
folder = [str(prepare_packaged_checkpoint(args.model, tp_size=world, dtype=dtype, layers=args.layers)) if rank == 0 else None]
if world > 1:
    dist.broadcast_object_list(folder, src=0)
folder = folder[0]

# 2. load it sharded by transformers' tensor-parallel plan, with FlexPrefill as the attention
model = AutoModelForCausalLM.from_pretrained(
    folder, dtype=dtype, attn_implementation="flexprefill", distributed_config=DistributedConfig(tp_size=world)
).eval()
context = model.config.get_text_config().max_position_embeddings
length = args.length or (min(context, 131072) - 16 if device.type == "cuda" else 2048)
set_default_config(FlexPrefillConfig(gamma=args.gamma, min_seq_len=min(32768, length // 2)))

# 3. the prompt: a needle in essays when the model has a tokenizer, else random tokens
has_tokenizer = (Path(folder) / "tokenizer_config.json").exists()  # random:<arch> models have none
tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
if tokenizer is not None:
    sample = build_needle_prompt(tokenizer, haystack_text(), length)
    ids = torch.tensor([sample["input_ids"]], device=device)
else:
    sample = None
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(0)).to(device)

# 4. prefill on every rank (each computes its own heads), then a few greedy tokens
with torch.inference_mode():
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: kernels compile, graphs capture
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    past, nxt, gen = out.past_key_values, out.logits[:, -1].argmax(-1), []
    for _ in range(12):
        gen.append(int(nxt))
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)

if rank == 0:
    answer = tokenizer.decode(gen, skip_special_tokens=True) if tokenizer is not None else str(gen)
    print(f"{args.model}: {ids.shape[1]} tokens on {world} rank(s), prefill {1000 * prefill:.1f} ms; answer {answer!r}")
    if sample is not None:
        print(f"needle {sample['number']}: {'found' if sample['number'] in answer else 'NOT found'}")
if world > 1:
    dist.destroy_process_group()
