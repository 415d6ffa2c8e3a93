"""The released models' architectures at full size, for the scripts that build them with
random weights on the GPU machine (full_size.py, bench_cuda.py, wan_pipeline_e2e.py)."""


def wan13b_dit():
    """Wan2.1-T2V-1.3B's transformer (the release's config.json)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
