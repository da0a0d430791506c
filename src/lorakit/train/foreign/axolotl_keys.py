"""Every key of Axolotl's config schema (`AxolotlInputConfig` and its bases, the plugins' arguments, the
deprecated aliases — axolotl-ai-cloud/axolotl@067b021c8b87, src/axolotl/utils/schemas/ and
integrations/*/args.py) that lorakit does not map to a key of its own: ignored with the reason (it
does not change what is trained), or accepted only at Axolotl's default and refused otherwise (it
would train something lorakit does not). The mapped keys are in axolotl.py; a test checks that the
two together cover the schema (tests/train/foreign_corpus/axolotl/SCHEMA_KEYS).
"""

from __future__ import annotations

from lorakit.train.foreign.mapping import (
    DISTRIBUTED,
    HUB,
    KERNELS,
    MEMORY,
    PIPELINE,
    REPORTING,
    TRACKING,
    Handler,
    at_default,
    ignore,
)

_MODEL_CHANGE = "it changes the base model lorakit loads (load it changed, save it as a model folder, point model: at it)"
_NOT_SFT = "a training objective other than supervised fine-tuning; lorakit trains SFT only"
_OTHER_OPTIMIZER = "an optimizer lorakit does not implement (it has adamw, adamw_8bit, paged_adamw_8bit/32bit)"
_SCHEDULE = "a learning-rate schedule lorakit does not implement (it has HF's linear, cosine, constant, …)"
_TOKENS = "it changes the tokenizer or the embedding rows, which a LoRA adapter file cannot carry"
_DATA_CHANGE = "it changes which examples are trained on, which lorakit does not reproduce"
_FREEZE = "it trains base weights beside the adapter (lorakit trains adapters; use lora_modules_to_save)"
_MULTIMODAL = "multimodal inputs (images, audio) are not supported; lorakit trains text"

IGNORED: dict[str, list[str]] = {
    TRACKING: ["use_wandb", "wandb_name", "wandb_run_id", "wandb_mode", "wandb_project", "wandb_entity", "wandb_watch",
               "wandb_log_model", "use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name",
               "hf_mlflow_log_artifacts", "use_comet", "comet_api_key", "comet_workspace", "comet_project_name",
               "comet_experiment_key", "comet_mode", "comet_online", "comet_experiment_config", "use_trackio",
               "trackio_project_name", "trackio_run_name", "trackio_space_id", "use_otel_metrics", "otel_metrics_host",
               "otel_metrics_port", "use_tensorboard", "profiler_steps", "profiler_steps_start",
               "include_tokens_per_second", "include_tkps", "use_swanlab", "swanlab_project", "swanlab_experiment_name",
               "swanlab_description", "swanlab_mode", "swanlab_workspace", "swanlab_api_key", "swanlab_log_model",
               "swanlab_web_host", "swanlab_api_host", "swanlab_lark_webhook_url", "swanlab_lark_secret",
               "swanlab_log_completions", "swanlab_completion_log_interval", "swanlab_completion_max_buffer"],
    HUB: ["hub_model_id", "hub_strategy", "hub_revision", "push_dataset_to_hub", "hf_use_auth_token"],
    KERNELS: ["use_kernels", "xformers_attention", "sdp_attention", "flex_attention", "flex_attn_compile_kwargs",
              "flash_attention", "flash_attn_cross_entropy", "flash_attn_fuse_mlp", "flash_attn_rms_norm",
              "flash_optimum", "sage_attention", "eager_attention", "attn_implementation", "gemma4_hybrid_attn_impl",
              "large_head_attention", "flash_attn_d512", "sdpa_varlen", "fused_attn_kernel", "experts_implementation",
              "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel", "chunked_cross_entropy",
              "chunked_cross_entropy_num_chunks", "tiled_mlp", "tiled_mlp_num_shards", "tiled_mlp_use_original_mlp",
              "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_compile_options",
              "cut_cross_entropy", "liger_rope", "liger_rms_norm", "liger_rms_norm_gated", "liger_layer_norm",
              "liger_swiglu", "liger_glu_activation", "liger_cross_entropy", "liger_fused_linear_cross_entropy",
              "liger_use_token_scaling", "use_scattermoe", "use_sonicmoe", "use_dsv4_kernels", "use_glm_dsa_kernels",
              "expert_backend", "moe_grouped_backend", "moe_dequant_chunk_size", "moe_bnb_fast",
              "dsv4_fp8_lora_kernel", "dsv4_shared_mlp_lora_kernel", "dsv4_fp4_grouped_mode", "dense_mixer",
              "dpo_use_liger_kernel", "dpo_padding_free", "batch_flattening", "tf32",
              "embeddings_skip_upcast", "fp32_norms", "fp32_norm_classes"],
    MEMORY: ["experimental_skip_move_to_device", "qlora_sharded_model_loading", "lora_on_cpu",
             "gradient_checkpointing_kwargs", "selective_checkpointing", "activation_offloading", "layer_offloading",
             "dynamic_checkpoint", "max_memory", "gpu_memory_limit", "low_cpu_mem_usage", "device", "device_map",
             "gc_steps", "torch_empty_cache_steps", "gc_collect_steps", "auto_find_batch_size",
             "pad_to_sequence_len", "pad_to_multiple_of"],
    PIPELINE: ["dataset_prepared_path", "skip_prepare_dataset", "num_dataset_shards_to_save", "dataset_processes",
               "dataset_num_proc", "dataset_keep_in_memory", "dataloader_pin_memory", "dataloader_num_workers",
               "dataloader_prefetch_factor", "remove_unused_columns", "is_preprocess", "preprocess_iterable",
               "total_num_tokens", "total_supervised_tokens", "sample_packing_eff_est", "sample_packing_group_size",
               "sample_packing_bin_size", "sample_packing_mp_start_method", "multipack_real_batches",
               "pretrain_multipack_buffer_size", "streaming", "streaming_multipack_buffer_size",
               "axolotl_config_path", "shuffle_merged_datasets", "shuffle_before_merging_datasets",
               "group_by_length", "curriculum_sampling", "sample_packing_sequentially", "eval_sample_packing",
               "eval_sequence_len", "dataloader_drop_last"],
    DISTRIBUTED: ["deepspeed", "deepcompile", "fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type",
                  "dp_shard_size", "dp_replicate_size", "sequence_parallel_degree", "context_parallel_size",
                  "heads_k_stride", "ring_attn_func", "tensor_parallel_size", "world_size", "local_rank", "ddp",
                  "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters",
                  "accelerator_config", "use_ray", "ray_run_name", "ray_num_workers", "resources_per_worker",
                  "expert_parallel_size", "expert_parallel_backend", "expert_parallel_num_nvl_bytes",
                  "expert_parallel_num_rdma_bytes", "expert_parallel_token_capacity",
                  "expert_parallel_fallback_on_unsupported"],
    REPORTING: ["eval_table_size", "do_causal_lm_eval", "eval_causal_lm_metrics", "do_bench_eval", "bench_dataset",
                "bench_split", "metric_for_best_model", "greater_is_better", "generate_samples",
                "num_generation_samples", "generation_max_new_tokens", "generation_temperature", "generation_top_p",
                "generation_top_k", "generation_prompt_ratio", "generation_do_sample", "lm_eval_tasks",
                "lm_eval_batch_size", "lm_eval_post_train", "lm_eval_model", "gradio_title", "gradio_share",
                "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens", "gradio_temperature",
                "evaluation_strategy", "eval_strategy", "evals_per_epoch"],
    "checkpoints: lorakit saves every train.save_steps and keeps train.keep_checkpoints, adapters only": [
        "save_strategy", "saves_per_epoch", "save_first_step", "save_only_model", "save_safetensors",
        "tokenizer_save_jinja_files"],
    "model class and tokenizer class: lorakit loads AutoModelForCausalLM and AutoTokenizer from the model folder": [
        "base_model_config", "model_type", "type_of_model", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
        "is_falcon_derived_model", "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model",
        "trainer_cls_model_type"],
    "lorakit runs no model code from the model folder": ["trust_remote_code"],
    "lorakit always refuses unknown keys": ["strict"],
    "use `lorakit train ... --resume`": ["resume_from_checkpoint", "auto_resume_from_checkpoints"],
    "use `lorakit merge` after training": ["merge_lora", "merge_method"],
    "a guard that stops a diverging run: lorakit runs every step, and metrics.jsonl / loss.png show a divergence": [
        "loss_watchdog_threshold", "loss_watchdog_patience"],
    "lorakit renders chats with the tokenizer's own chat template and its turn boundaries": ["eot_tokens"],
    "a path of Axolotl's own tooling": ["torchdistx_path"],
    "plugins only enable keys; each of those keys is mapped or refused on its own": ["plugins"],
    "lorakit's adapters are stored in their own dtype (fp32 when trained)": ["peft_autocast_adapter_dtype"],
    "the adapter is saved as trained; weight tying is the base model's": ["peft_ensure_weight_tying"],
}

AT_DEFAULT: dict[str, dict[str, object]] = {
    _MODEL_CHANGE: {"cls_model_config": None, "tokenizer_config": None, "model_quantization_config": None,
                    "model_quantization_config_kwargs": None, "use_onebitllms": None, "gptq": None,
                    "overrides_of_model_config": None, "model_config": None, "overrides_of_model_kwargs": None,
                    "model_kwargs": None, "revision_of_model": None, "model_revision": None, "rope_scaling": None,
                    "s2_attention": None, "scaling_softmax": None, "scaling_softmax_factor": None,
                    "scaling_softmax_bias": None, "quantize_moe_experts": False, "llama4_linearized_experts": None,
                    "reinit_weights": None, "fp8": None, "fp8_enable_fsdp_float8_all_gather": None, "float32": None,
                    "qat": None, "quantization": None, "nonexpert_quantization": None, "dsv4_fp8_nonexpert_mode": None,
                    "dsv4_bf16_all": None, "gemma4_fp8_nonexpert": None, "gemma4_nf4_nonexpert": None,
                    "nvfp4_merge_aware": None, "nvfp4_merge_aware_start_step": None, "llmcompressor": None,
                    "use_pose": None, "pose_split_on_token_ids": None, "pose_max_context_len": None,
                    "pose_num_chunks": None, "max_packed_sequence_len": None, "gptq_groupsize": None,
                    "gptq_model_v1": None, "gptq_disable_exllama": None},
    _NOT_SFT: {"rl": None, "trl": None, "vllm": None, "ebft": None, "reward_model": None, "process_reward_model": None,
               "center_rewards_coefficient": None, "num_labels": None, "dpo_beta": None, "dpo_use_logits_to_keep": None,
               "dpo_generate_during_eval": None, "dpo_norm_loss": None, "rpo_alpha": None, "dpo_use_weighting": None,
               "dpo_label_smoothing": None, "precompute_ref_log_probs": None, "dpo_loss_type": None,
               "dpo_loss_weights": None, "orpo_alpha": None, "simpo_gamma": None, "cpo_alpha": None,
               "kto_desirable_weight": None, "kto_undesirable_weight": None, "rl_beta": None, "max_prompt_len": None,
               "pretraining_dataset": None, "pretraining_sample_concatenation": None, "pretrain_multipack_attn": True,
               "kd_trainer": None, "kd_ce_alpha": None, "kd_alpha": None, "kd_temperature": None, "kd_beta": None,
               "kd_normalize_topk": None, "kd_online_server_base_url": None, "kd_online_topk": None,
               "kd_online_server": None, "kd_online_timeout": None, "kd_temperature_min": None, "diffusion": None,
               "use_eaft": None, "eaft_alpha": 1.0, "eaft_k": 20, "neftune_noise_alpha": None,
               "noisy_embedding_alpha": None, "grokfast_alpha": None, "grokfast_lamb": None, "nemo_gym_enabled": None,
               "nemo_gym_dir": None, "nemo_gym_auto_clone": None, "nemo_gym_config_paths": None,
               "nemo_gym_head_port": None, "nemo_gym_server_timeout": None, "nemo_gym_verify_timeout": None,
               "nemo_gym_run_timeout": None, "nemo_gym_datasets": None, "nemo_gym_auto_start": None,
               "nemo_gym_model_name": None, "nemo_gym_multi_turn": None, "nemo_gym_max_turns": None,
               "hatchery": None, "mora": None, "trainer_cls": None},
    _OTHER_OPTIMIZER: {"optim_args": None, "optim_target_modules": None, "embedding_lr": None, "embedding_lr_scale": None,
                       "lr_groups": None, "adam_epsilon2": None, "adam_beta3": None, "dion_lr": None,
                       "dion_momentum": None, "dion_rank_fraction": 1.0, "dion_rank_multiple_of": 1,
                       "qgalore_rank": 256, "qgalore_update_proj_gap": 200, "qgalore_scale": 0.25,
                       "qgalore_proj_type": "std", "qgalore_proj_quant": True, "qgalore_proj_bits": 4,
                       "qgalore_proj_group_size": 256, "qgalore_cos_threshold": 0.4, "qgalore_gamma_proj": 2,
                       "qgalore_queue_size": 5},
    _SCHEDULE: {"lr_scheduler_kwargs": None, "lr_quadratic_warmup": None, "cosine_min_lr_ratio": None,
                "cosine_constant_lr_ratio": None, "lr_div_factor": None, "jagged_restart_steps": None,
                "jagged_restart_warmup_steps": None, "jagged_restart_anneal_steps": None, "relora": None,
                "relora_prune_ratio": None, "relora_prune_method": "magnitude", "relora_cpu_offload": None},
    _TOKENS: {"tokens": None, "added_tokens_overrides": None, "resize_token_embeddings_to_32x": None,
              "mean_resizing_embeddings": False, "shrink_embeddings": None, "fix_untrained_tokens": None,
              "peft_trainable_token_indices": None, "chat_template_jinja": None, "chat_template_kwargs": None,
              "default_system_message": None},
    _DATA_CHANGE: {"dataset_shard_num": None, "dataset_shard_idx": None, "dataset_exact_deduplication": None,
                   "min_sample_len": None, "spectrum_top_fraction": None, "spectrum_model_name": None},
    _FREEZE: {"unfrozen_parameters": None, "freeze_mm_modules": None, "lisa_n_layers": None,
              "lisa_step_interval": None, "lisa_layers_attribute": "model.layers", "lora_target_parameters": None,
              "peft_layer_replication": None, "peft": None},
    _MULTIMODAL: {"image_size": None, "image_resize_algorithm": None, "role_boundaries": None, "processor_type": None,
                  "processor_kwargs": None},
    "a tokenizer lorakit does not load (mistral-common): lorakit tokenizes with the model folder's HF tokenizer": {
        "tokenizer_use_mistral_common": None},
    "load_best_model_at_end keeps an earlier checkpoint as the result; lorakit's adapter is the last step's": {
        "load_best_model_at_end": False},
    "early stopping ends the run before its last step; lorakit runs every step": {"early_stopping_patience": None},
}


def handlers() -> dict[str, Handler]:
    table: dict[str, Handler] = {}
    for why, keys in IGNORED.items():
        table.update({key: ignore(why) for key in keys})
    for why, defaults in AT_DEFAULT.items():
        table.update({key: at_default(default, why) for key, default in defaults.items()})
    return table
