"""Run under torchrun by test_tensor_parallel.py: a left-padded batch and a prefill over a cached
prefix through a model sharded over the ranks (FlexPrefill's varlen path on each rank's heads),
against the same model in one process.  Rank 0 writes the comparison to argv[1] as JSON."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

from flexprefill import FlexPrefillConfig
from flexprefill.integrations import transformers as tf
from flexprefill.integrations.tensor_parallel import init_distributed, load_sharded, prepare_checkpoint
from flexprefill_tools.hf_compat import with_cache

out_path, cache = sys.argv[1], sys.argv[2]
rank, world, device = init_distributed()
folder = [str(prepare_checkpoint("random:tiny-gemma3", tp_size=world, dtype=torch.float32, cache_dir=cache))
          if rank == 0 else None]
dist.broadcast_object_list(folder, src=0)
folder = folder[0]
cfg = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=1.0, min_budget=0)

g = torch.Generator().manual_seed(3)
ids = torch.randint(0, 512, (2, 320), generator=g)
mask = torch.ones(2, 320, dtype=torch.long)
mask[1, :96] = 0  # left padding: the second sequence has 224 tokens
split = 256  # chunked prefill of the first sequence: 256 tokens, then 64 over the cached prefix


def forward(model):
    with torch.no_grad(), tf.patched(model, cfg):
        padded = model(input_ids=ids, attention_mask=mask).logits
        rec = tf.last_record(model)
        past = DynamicCache(config=model.config)
        model(input_ids=ids[:1, :split], use_cache=True, **with_cache(model, past))
        chunk = model(input_ids=ids[:1, split:], use_cache=True, **with_cache(model, past)).logits
        rec_chunk = tf.last_record(model)
    paths = {i: (r.path, r.varlen) for i, r in rec.items()}
    paths_chunk = {i: (r.path, r.varlen) for i, r in rec_chunk.items()}
    return padded, chunk, paths, paths_chunk


single = None
if rank == 0:
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    single = forward(m)
    with torch.no_grad():
        dense = (m(input_ids=ids, attention_mask=mask).logits, None)
    del m
dist.barrier()
model = load_sharded(folder, tp_size=world, dtype=torch.float32)
sharded = forward(model)
if rank == 0:
    valid = mask.bool()
    res = {
        "padded_max_diff": float((sharded[0] - single[0])[valid].abs().max()),
        "padded_vs_sdpa_max_diff": float((sharded[0] - dense[0])[valid].abs().max()),
        "chunk_max_diff": float((sharded[1] - single[1]).abs().max()),
        "paths_padded": {str(k): list(v) for k, v in sharded[2].items()},
        "paths_chunk": {str(k): list(v) for k, v in sharded[3].items()},
        "local_q_rows": int(model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]),
    }
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
dist.destroy_process_group()
