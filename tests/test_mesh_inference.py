"""Inference over a mesh of 8 fake CPU devices (jaxar.parallel): the same tokens as one device, and the
params and the KV cache really split. One subprocess runs every case (the device count is fixed at start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax, numpy as np
    from jaxar import parallel
    from jaxar.cache import KVCache
    from jaxar.config import ModelConfig
    from jaxar.decode.generate import generate
    from jaxar.decode.sampling import SamplingConfig
    from jaxar.decode.speculative import speculative_generate
    from jaxar.models.transformer import forward, init_params
    from jaxar.train.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=64,
                            max_seq_len=256, initializer_range=0.1)
    dcfg = cfg.replace(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, mlp_dim=32)
    params, dparams = init_params(cfg, 0), init_params(dcfg, 1)
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, 64, (8, 16)).astype(np.int32)
    prompts[:, 8:] = prompts[:, :8]  # repeats, so the n-gram drafter finds matches
    lengths = np.array([16, 9, 12, 5, 16, 7, 10, 3])
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_k=20)
    N = 8
    tok = lambda out: np.asarray(out.tokens).tolist()
    spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec] + [None] * (
        x.ndim - len(x.sharding.spec))
    T0 = [time.time()]

    def lap(name):  # stage times on stderr
        print(name, round(time.time() - T0[0], 1), file=sys.stderr, flush=True)
        T0[0] = time.time()
    res = {}

    one = {"greedy": tok(generate(params, prompts, lengths, config=cfg, max_new_tokens=N)),
           "sampled": tok(generate(params, prompts, lengths, config=cfg, max_new_tokens=N, sampling=sampled,
                                   seed=7))}
    q8 = cfg.replace(weight_quant="int8", kv_cache_dtype="int8")
    one["int8"] = tok(generate(params, prompts, lengths, config=q8, max_new_tokens=N))
    res["one"] = one
    lap("one device")

    # data=2 x tensor=4: heads, kv heads, MLP and vocab over tensor; batch over data
    mesh = make_mesh({"data": 2, "tensor": 4})
    sp, sd = parallel.shard_params(params, cfg, mesh), parallel.shard_params(dparams, dcfg, mesh)
    layer = sp["layers"][0]
    kw = dict(config=cfg, max_new_tokens=N, num_draft=3, draft_params=sd, draft_config=dcfg)
    res["dt"] = {
        "greedy": tok(generate(sp, prompts, lengths, config=cfg, max_new_tokens=N)),
        "sampled": tok(generate(sp, prompts, lengths, config=cfg, max_new_tokens=N, sampling=sampled, seed=7)),
        "spec_model": tok(speculative_generate(sp, prompts, lengths, **kw)),
        "spec_ngram": tok(speculative_generate(sp, prompts, lengths, config=cfg, max_new_tokens=N, num_draft=3,
                                               draft="ngram")),
        "specs": {"q": spec(layer["attn"]["q_proj"]["kernel"]), "o": spec(layer["attn"]["o_proj"]["kernel"]),
                  "up": spec(layer["mlp"]["up_proj"]["kernel"]), "down": spec(layer["mlp"]["down_proj"]["kernel"]),
                  "embed": spec(sp["embed"]["embedding"]), "lm_head": spec(sp["lm_head"]["kernel"]),
                  "q_shard": list(layer["attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape)},
        "fused": "qkv_proj" in layer["attn"]}
    try:  # a draft model left on one device: a one-line error before anything compiles
        speculative_generate(sp, prompts, lengths, **dict(kw, draft_params=dparams))
    except ValueError as e:
        res["dt"]["mixed_error"] = str(e)
    lap("data=2 tensor=4")

    # the same mesh from a saved model: from_pretrained(mesh=) and sample.py --mesh (the programs above, reused)
    import io, tempfile
    import jaxar
    from jaxar.decode.cli import run
    saved = tempfile.mkdtemp() + "/m"
    jaxar.save_pretrained(cfg, params, saved)
    _, fp = jaxar.from_pretrained(saved, mesh=mesh)
    rows = tempfile.mkdtemp() + "/p.jsonl"
    with open(rows, "w") as f:
        f.writelines(json.dumps({"tokens": p[:n].tolist()}) + "\\n" for p, n in zip(prompts, lengths))
    out = io.StringIO()
    code = run(["--model", saved, "--prompts", rows, "--temperature", "0", "--max-new-tokens", str(N),
                "--mesh", "data=2,tensor=4", "--batch-size", "8", "--no-progress"], stdout=out)
    res["fp"] = {"mesh": tok(generate(fp, prompts, lengths, config=cfg, max_new_tokens=N)),
                 "q": spec(fp["layers"][0]["attn"]["q_proj"]["kernel"]), "cli_code": code,
                 "cli": [json.loads(line)["tokens"] for line in out.getvalue().splitlines()]}
    lap("from_pretrained(mesh=) and sample.py --mesh")

    # data=8: params replicated and fused (the batch split eight ways; the cache spec is checked directly)
    mesh = make_mesh({"data": 8})
    sp = parallel.shard_params(params, cfg, mesh)
    res["d8"] = {"cache": spec(parallel.shard_cache(KVCache.empty(cfg, 8, 64), mesh).k[0]),
                 "fused": "qkv_proj" in sp["layers"][0]["attn"], "embed": spec(sp["embed"]["embedding"]),
                 "qkv": spec(sp["layers"][0]["attn"]["qkv_proj"]["kernel"])}

    # data=2 x fsdp=2 x tensor=2 with int8 weights and an int8 cache
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sp = parallel.shard_params(params, q8, mesh)
    _, cache = forward(sp, prompts, config=q8, cache=KVCache.empty(q8, 8, 64), num_new=lengths)
    q = sp["layers"][0]["attn"]["q_proj"]
    res["dft8"] = {"int8": tok(generate(sp, prompts, lengths, config=q8, max_new_tokens=N)),
                   "lengths": spec(cache.lengths), "cache_shard": list(cache.k[0].addressable_shards[0].data.shape),
                   "q": spec(q["kernel"]), "q_dtype": str(q["kernel"].dtype), "q_scale": spec(q["kernel_scale"]),
                   "cache": spec(cache.k[0]), "cache_dtype": str(cache.k[0].dtype), "k_scale": spec(cache.k_scale[0])}
    lap("data=2 fsdp=2 tensor=2 int8")
    print("RESULT " + json.dumps(res))
""")


def test_generate_and_speculative_over_meshes_of_eight_devices_match_one_device(tmp_path):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    one, dt, d8, dft8 = res["one"], res["dt"], res["d8"], res["dft8"]
    # data=2 x tensor=4: the tokens of one device, for every method
    assert dt["greedy"] == one["greedy"] and dt["sampled"] == one["sampled"]
    assert dt["spec_model"] == one["greedy"] and dt["spec_ngram"] == one["greedy"]  # greedy speculative == greedy
    assert one["sampled"] != one["greedy"]
    s = dt["specs"]
    assert "draft_params are on one device" in dt["mixed_error"] and "shard_params" in dt["mixed_error"]
    assert not dt["fused"]  # q / k / v stay separate, each split by heads
    assert s["q"] == [None, 'tensor', None] and s["o"] == ['tensor', None, None]
    assert s["up"] == [None, 'tensor'] and s["down"] == ['tensor', None]
    assert s["embed"] == ['tensor', None] and s["lm_head"] == [None, 'tensor']
    assert s["q_shard"] == [32, 1, 8]  # 4 heads over 4 devices
    fp = res["fp"]  # from_pretrained(mesh=) places like shard_params; sample.py --mesh gives the same tokens
    assert fp["mesh"] == one["greedy"] and fp["q"] == [None, 'tensor', None] and fp["cli_code"] == 0
    assert fp["cli"] == one["greedy"]
    # data=8: replicated, fused params; the cache split by batch eight ways
    assert d8["fused"] and d8["qkv"] == [None, None] and d8["embed"] == [None, None]
    assert d8["cache"] == ['data', None, None, None]
    # data x fsdp x tensor with int8 weights and cache: the one-device int8 tokens, int8 shards
    assert dft8["int8"] == one["int8"]
    assert dft8["q"] == ['fsdp', 'tensor', None] and dft8["q_dtype"] == "int8"
    assert dft8["q_scale"] == ['tensor', None]
    assert dft8["cache"] == [['data', 'fsdp'], None, 'tensor', None] and dft8["cache_dtype"] == "int8"
    assert dft8["k_scale"] == [['data', 'fsdp'], None, 'tensor']
    # that cache was built unsplit: forward constrained it (batch over data x fsdp, kv heads over tensor)
    assert dft8["lengths"] == [['data', 'fsdp']] and dft8["cache_shard"] == [2, 64, 2, 8]
