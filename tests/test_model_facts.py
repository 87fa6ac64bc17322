"""Model facts from config.json: MoE layers, expert bytes per format, KV bytes (independent arithmetic)."""

import json
import math
import random

import pytest

from lvllm_cli.model_facts import ConfigError, facts_from_config, read_config


def qwen3_moe_config(rng: random.Random, **over):
    heads = rng.choice([4, 8, 16, 32])
    cfg = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": rng.randint(2, 60),
        "hidden_size": 128 * rng.randint(1, 32),
        "intermediate_size": 128 * rng.randint(1, 64),
        "moe_intermediate_size": 128 * rng.randint(1, 12),
        "num_experts": rng.choice([8, 16, 64, 128, 256]),
        "num_experts_per_tok": rng.choice([1, 2, 4, 8]),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([h for h in (1, 2, 4, 8) if heads % h == 0]),
        "head_dim": rng.choice([64, 128]),
        "vocab_size": rng.randint(1000, 160000),
        "tie_word_embeddings": rng.random() < 0.3,
        "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16",
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("seed", range(20))
def test_qwen3_moe_sizes_against_hand_arithmetic(seed):
    rng = random.Random(seed)
    cfg = qwen3_moe_config(rng)
    f = facts_from_config(cfg)
    L, H, I, E = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    assert f.moe_layers == list(range(L))
    assert f.expert_bytes_per_layer() == E * 3 * H * I * 2
    assert f.total_expert_bytes() == L * E * 3 * H * I * 2
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = H * q + 2 * H * kv + q * H + H * E + 2 * H  # q, k, v, o, router, two norms
    embeds = cfg["vocab_size"] * H * (1 if cfg["tie_word_embeddings"] else 2)
    assert f.non_expert_bytes() == 2 * (L * per_layer + embeds + H)
    # KV: K and V, kv heads x head_dim, 2 bytes, every layer has full attention
    assert f.kv_bytes_per_token_layer(1) * L == 2 * kv * 2 * L
    assert f.state_bytes_per_seq_layer(0, 1) == 0


@pytest.mark.parametrize("seed", range(10))
def test_sparse_step_and_mlp_only_layers(seed):
    rng = random.Random(100 + seed)
    L = rng.randint(4, 40)
    step = rng.randint(1, 3)
    keep = step - 1  # layer (step - 1) is sparse by the step rule; it stays out of mlp_only_layers
    dense = sorted(rng.sample([i for i in range(L) if i != keep], rng.randint(0, L // 3)))
    f = facts_from_config(qwen3_moe_config(rng, num_hidden_layers=L, decoder_sparse_step=step, mlp_only_layers=dense))
    expected = [i for i in range(L) if (i + 1) % step == 0 and i not in dense]
    assert keep in expected and f.moe_layers == expected


def test_fp8_block_bytes():
    rng = random.Random(7)
    for _ in range(10):
        cfg = qwen3_moe_config(rng)
        cfg["hidden_size"] = rng.randint(100, 5000)
        cfg["moe_intermediate_size"] = rng.randint(100, 3000)
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        f = facts_from_config(cfg)
        H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
        blocks = 3 * math.ceil(H / 128) * math.ceil(I / 128)  # gate, up: [I,H]; down: [H,I]
        assert f.expert_bytes_per_layer() == E * (3 * H * I + 4 * blocks)
        assert f.quant.label == "fp8 block 128x128"


@pytest.mark.parametrize("group, symmetric", [(32, True), (128, True), (128, False)])
def test_int4_compressed_tensors_bytes(group, symmetric):
    cfg = qwen3_moe_config(random.Random(group), hidden_size=2048, moe_intermediate_size=768, num_experts=16)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group, "symmetric": symmetric}}},
    }
    f = facts_from_config(cfg)
    n = 3 * 2048 * 768  # weights of one expert
    groups = n // group
    zeros = 0 if symmetric else groups // 2
    assert f.expert_bytes_per_layer() == 16 * (n // 2 + 2 * groups + zeros)
    # int4 checkpoints: non-expert linears are counted at 16 bits
    assert f.non_expert_bytes() == facts_from_config({k: v for k, v in cfg.items() if k != "quantization_config"}).non_expert_bytes()


def test_awq_and_gptq_store_zero_points():
    cfg = qwen3_moe_config(random.Random(1), hidden_size=1024, moe_intermediate_size=512, num_experts=4, num_experts_per_tok=2)
    for method in ("awq", "gptq"):
        cfg["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
        n = 3 * 1024 * 512
        assert facts_from_config(cfg).expert_bytes_per_layer() == 4 * (n // 2 + 2 * (n // 128) + (n // 128) // 2)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 8}
    with pytest.raises(ConfigError, match="only 4-bit"):
        facts_from_config(cfg)


def test_compressed_tensors_fp8_channel_and_unsupported():
    cfg = qwen3_moe_config(random.Random(2), hidden_size=1024, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2)
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}
    f = facts_from_config(cfg)
    # one fp32 scale per output row: gate/up have 256 rows, down 1024
    assert f.expert_bytes_per_layer() == 4 * (3 * 1024 * 256 + 4 * (256 + 256 + 1024))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    with pytest.raises(ConfigError, match="'bitsandbytes' is not supported"):
        facts_from_config(cfg)


def test_qwen3_next_hybrid_attention():
    cfg = {
        "model_type": "qwen3_next", "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 5120,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 512,
        "num_experts_per_tok": 10, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "vocab_size": 151936, "max_position_embeddings": 262144, "torch_dtype": "bfloat16",
    }  # fmt: skip
    f = facts_from_config(cfg)
    assert f.full_attention_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
    # KV per token: 12 layers x K,V x 2 heads x 256 x 2 bytes
    assert sum(f.kv_bytes_per_token_layer(1) for _ in f.full_attention_layers) == 12 * 2 * 2 * 256 * 2
    # linear-attention state per sequence and layer: conv (2*16*128 + 32*128) x 3 + 32 x 128 x 128, 2 bytes
    assert f.state_bytes_per_seq_layer(0, 1) == ((2 * 2048 + 4096) * 3 + 32 * 128 * 128) * 2
    assert f.state_bytes_per_seq_layer(3, 1) == 0
    assert f.state_bytes_per_seq_layer(0, 2) == ((2 * 2048 + 4096) // 2 * 3 + 16 * 128 * 128) * 2
    # 80B model: routed experts 48 x 512 x 3 x 2048 x 512 ~ 77.3 G params
    assert f.total_expert_bytes() == 48 * 512 * 3 * 2048 * 512 * 2
    total_params = (f.total_expert_bytes() + f.non_expert_bytes()) / 2
    assert 79e9 < total_params < 82e9
    # layer_types wins over the interval when present
    types = ["full_attention" if i % 2 else "linear_attention" for i in range(48)]
    assert facts_from_config({**cfg, "layer_types": types}).full_attention_layers == list(range(1, 48, 2))
    with pytest.raises(ConfigError, match="layer_types"):
        facts_from_config({**cfg, "layer_types": types[:5]})


def test_glm4_moe_first_k_dense_and_shared_experts():
    cfg = {
        "model_type": "glm4_moe", "num_hidden_layers": 46, "hidden_size": 4096, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 1, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151552, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    }  # fmt: skip
    f = facts_from_config(cfg)
    assert f.moe_layers == list(range(1, 46))
    assert f.shared_intermediate_size == 1408
    assert f.total_expert_bytes() == 45 * 128 * 3 * 4096 * 1408 * 2
    # total ~ 106-110 B params (the MTP layer is not counted)
    assert 104e9 < (f.total_expert_bytes() + f.non_expert_bytes()) / 2 < 111e9


def test_deepseek_moe_layer_freq_and_mla_kv():
    cfg = {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "vocab_size": 129280, "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }  # fmt: skip
    f = facts_from_config(cfg)
    assert f.moe_layers == list(range(3, 61))
    assert f.kv_bytes_per_token_layer(1) == (512 + 64) * 2 == f.kv_bytes_per_token_layer(8)  # MLA latent is replicated
    total = f.total_expert_bytes() / 1 + f.non_expert_bytes() / 1
    assert 640e9 < total < 720e9  # ~671B params, mostly fp8
    f2 = facts_from_config({**cfg, "moe_layer_freq": 2, "first_k_dense_replace": 1, "num_hidden_layers": 10})
    assert f2.moe_layers == [2, 4, 6, 8]


def test_errors_name_the_key():
    cfg = qwen3_moe_config(random.Random(3))
    with pytest.raises(ConfigError, match="no MoE fields"):
        facts_from_config({k: v for k, v in cfg.items() if k != "num_experts"})
    with pytest.raises(ConfigError, match="missing hidden_size"):
        facts_from_config({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="num_hidden_layers: expected an integer"):
        facts_from_config({**cfg, "num_hidden_layers": "48"})
    with pytest.raises(ConfigError, match="larger than the number of experts"):
        facts_from_config({**cfg, "num_experts": 4, "num_experts_per_tok": 8})
    with pytest.raises(ConfigError, match="torch_dtype"):
        facts_from_config({**cfg, "torch_dtype": "int8"})
    with pytest.raises(ConfigError, match="JSON object"):
        facts_from_config([1, 2])


def test_no_moe_layer_selected():
    cfg = qwen3_moe_config(random.Random(4), num_hidden_layers=2, decoder_sparse_step=3)
    with pytest.raises(ConfigError, match="select no MoE layer"):
        facts_from_config(cfg)


def test_text_config_nesting_and_dtype_spelling():
    inner = qwen3_moe_config(random.Random(5))
    inner.pop("torch_dtype")
    inner["dtype"] = "float16"
    f = facts_from_config({"model_type": "wrapper", "text_config": inner})
    assert f.num_experts == inner["num_experts"] and f.dtype == "float16"


def test_read_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert read_config(tmp_path) == {"a": 1}
