"""Every key of LLaMA-Factory's training YAML schema (hiyouga/LLaMA-Factory@ff6d4d12eeb0, src/llamafactory/
hparams/: Model, Data, Finetuning, Generating, Training and Evaluation arguments) and of HF's
Seq2SeqTrainingArguments beneath them, that lorakit does not map to a key of its own: ignored with the
reason (it does not change what is trained), or accepted only at the default and refused otherwise.
The mapped keys are in llamafactory.py; a test checks that the two cover the schema
(tests/train/foreign_corpus/llamafactory/SCHEMA_KEYS, and HF's fields read from transformers).
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
_NOT_SFT = "a training method or objective other than LoRA supervised fine-tuning; lorakit trains LoRA SFT"
_OPTIMIZER = "an optimizer lorakit does not implement (it has adamw, adamw_8bit, paged_adamw_8bit/32bit)"
_TOKENS = "it changes the tokenizer or the embedding rows, which a LoRA adapter file cannot carry"
_PROMPTS = "it changes how prompts are rendered or masked, which lorakit does not reproduce"
_INFERENCE = "inference, export and evaluation settings (llamafactory-cli chat / export / eval), not training"
_MULTIMODAL = "image / video / audio settings: lorakit trains text (they matter only with multimodal data)"
_TRAINER = "a Trainer setting about logging, saving, evaluation, devices or speed: what is trained does not change"

IGNORED: dict[str, list[str]] = {
    TRACKING: ["use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
               "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret", "report_to",
               "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "plot_loss",
               "include_effective_tokens_per_second", "enable_torch_profiler", "profiler_output_dir",
               "profiler_wait_steps", "profiler_warmup_steps", "profiler_active_steps", "profiler_repeat",
               "profiler_record_shapes", "profiler_profile_memory", "profiler_with_stack", "profile_modules",
               "print_param_status", "logging_dir", "logging_strategy", "logging_first_step", "log_on_each_node",
               "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level", "log_level_replica",
               "disable_tqdm", "skip_memory_metrics", "include_tokens_per_second"],
    HUB: ["hf_hub_token", "ms_hub_token", "om_hub_token", "cache_dir", "push_to_hub", "hub_token", "hub_private_repo",
          "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "export_hub_model_id"],
    KERNELS: ["flash_attn", "use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "use_v1_kernels",
              "use_liger_kernel", "liger_kernel_config", "torch_compile", "torch_compile_backend", "torch_compile_mode",
              "tf32", "block_diag_attn", "compute_dtype", "model_max_length", "use_fast_tokenizer"],
    MEMORY: ["low_cpu_mem_usage", "device_map", "quantization_device_map", "use_reentrant_gc",
             "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "offload_folder",
             "torch_empty_cache_steps", "auto_find_batch_size", "use_cache", "enable_jit_checkpoint"],
    PIPELINE: ["overwrite_cache", "preprocessing_batch_size", "preprocessing_num_workers", "streaming", "buffer_size",
               "tokenized_path", "data_shared_file_system", "media_dir", "dataloader_num_workers",
               "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
               "dataloader_multiprocessing_context", "dataloader_in_order", "dataloader_drop_last",
               "remove_unused_columns", "label_names", "length_column_name", "ignore_pad_token_for_loss",
               "disable_shuffling", "train_sampling_strategy", "group_by_length", "sortish_sampler", "data_seed",
               "ignore_data_skip", "full_determinism"],
    DISTRIBUTED: ["ray_num_workers", "ray_init_kwargs", "master_addr", "master_port", "ddp_timeout",
                  "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
                  "ddp_backend", "fsdp", "fsdp_config", "deepspeed", "local_rank", "accelerator_config",
                  "parallelism_config", "use_cpu", "average_tokens_across_devices", "save_on_each_node",
                  "hyper_parallel_cp_size", "ray_run_name", "ray_storage_path", "ray_storage_filesystem",
                  "resources_per_worker", "placement_strategy", "ray_scope", "fsdp_transformer_layer_cls_to_wrap",
                  "fsdp_min_num_params"],
    REPORTING: ["do_eval", "do_predict", "eval_strategy", "evaluation_strategy", "eval_delay", "prediction_loss_only",
                "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
                "include_for_metrics", "batch_eval_metrics", "eval_num_beams", "eval_on_each_dataset",
                "compute_accuracy", "metric_for_best_model", "greater_is_better", "predict_with_generate",
                "generation_max_length", "generation_num_beams", "generation_config", "bf16_full_eval",
                "fp16_full_eval", "debug"],
    _INFERENCE: ["infer_backend", "use_kv_cache", "infer_dtype", "export_dir", "export_size", "export_device",
                 "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
                 "export_quantization_maxlen", "export_legacy_format", "vllm_maxlen", "vllm_gpu_util",
                 "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config", "sglang_maxlen", "sglang_mem_fraction",
                 "sglang_tp_size", "sglang_config", "sglang_lora_backend", "do_sample", "temperature", "top_p", "top_k",
                 "num_beams", "max_length", "max_new_tokens", "repetition_penalty", "length_penalty",
                 "skip_special_tokens", "task", "task_dir", "batch_size", "lang", "n_shot", "save_dir", "download_mode"],
    _MULTIMODAL: ["image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
                  "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
                  "freeze_vision_tower", "freeze_multi_modal_projector"],
    "checkpoints: lorakit saves every train.save_steps and keeps train.keep_checkpoints, adapters only": [
        "save_strategy", "save_only_model", "save_safetensors", "overwrite_output_dir",
        "restore_callback_states_from_checkpoint"],
    "use `lorakit train ... --resume`": ["resume_from_checkpoint"],
    "lorakit runs no model code from the model folder": ["trust_remote_code"],
    "lorakit train trains": ["do_train"],
    "lorakit always saves PiSSA adapters converted to plain LoRA": ["pissa_convert"],
    "the tool-call format of the chat template; lorakit trains text turns": ["tool_format"],
    "thinking content is kept as the tokenizer's template renders it": ["preserve_thinking"],
}

AT_DEFAULT: dict[str, dict[str, object]] = {
    _MODEL_CHANGE: {"model_revision": "main", "rope_scaling": None, "shift_attn": False, "mixture_of_depths": None,
                    "upcast_layernorm": False, "upcast_lmhead_output": False, "train_from_scratch": False,
                    "pure_bf16": False, "fp8": False, "fp8_backend": "auto", "fp8_enable_fsdp_float8_all_gather": False,
                    "use_kt": False, "kt_cpu_activation": None, "kt_weight_path": None, "kt_non_expert_weight_path": None,
                    "kt_expert_checkpoint_path": None, "kt_use_lora_experts": None, "kt_lora_expert_num": None,
                    "kt_lora_expert_intermediate_size": None, "_kt_inference_config": None, "_kt_config_handle": None,
                    "_kt_adapter_artifact_path": None, "moe_aux_loss_coef": None},
    _NOT_SFT: {"adapter_name_or_path": None, "adapter_folder": None, "create_new_adapter": False,
               "use_badam": False, "badam_mode": "layer", "badam_start_block": None, "badam_switch_mode": "ascending",
               "badam_switch_interval": 50, "badam_update_ratio": 0.05, "badam_mask_mode": "adjacent",
               "badam_verbose": 0, "use_apollo": False, "apollo_target": "all", "apollo_rank": 16,
               "apollo_update_interval": 200, "apollo_scale": 32.0, "apollo_proj": "random", "apollo_proj_type": "std",
               "apollo_scale_type": "channel", "apollo_layerwise": False, "apollo_scale_front": False,
               "use_galore": False, "galore_target": "all", "galore_rank": 16, "galore_update_interval": 200,
               "galore_scale": 2.0, "galore_proj_type": "std", "galore_layerwise": False, "pref_beta": 0.1,
               "pref_ftx": 0.0, "pref_bco_weight": 0.0, "pref_loss": "sigmoid", "dpo_label_smoothing": 0.0,
               "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0, "simpo_gamma": 0.5, "ppo_buffer_size": 1,
               "ppo_epochs": 4, "ppo_score_norm": False, "ppo_target": 6.0, "ppo_whiten_rewards": False,
               "ref_model": None, "ref_model_adapters": None, "ref_model_quantization_bit": None, "reward_model": None,
               "reward_model_adapters": None, "reward_model_quantization_bit": None, "reward_model_type": "lora",
               "ld_alpha": None, "module_dropout": 0.0, "oft_rank": 0, "oft_block_size": 32, "oft_target": "all",
               "freeze_trainable_layers": 2, "freeze_trainable_modules": "all", "freeze_extra_modules": None,
               "use_llama_pro": False, "use_adam_mini": False, "use_mca": False, "use_megatron_bridge": False,
               "megatron_bridge_args": None, "use_hyper_parallel": False, "hyper_parallel_args": None,
               "use_muon": False, "use_dft_loss": False, "use_asft_loss": False, "asft_alpha": 0.1,
               "use_eaft_loss": False, "eaft_alpha": 1.0, "freeze_language_model": False, "label_smoothing_factor": 0.0,
               "neftune_noise_alpha": None},
    _OPTIMIZER: {"optim_args": None, "optim_target_modules": None, "lr_scheduler_kwargs": {}},
    _TOKENS: {"resize_vocab": False, "split_special_tokens": False, "add_tokens": None, "add_special_tokens": None,
              "new_special_tokens_config": None, "init_special_tokens": "noise_init"},
    _PROMPTS: {"mask_history": False, "default_system": None, "enable_thinking": True},
    "it mixes data sets other than one after another, which lorakit does not reproduce": {
        "mix_strategy": "concat", "interleave_probs": None},
    "load_best_model_at_end keeps an earlier checkpoint as the result; lorakit's adapter is the last step's": {
        "load_best_model_at_end": False},
    "early stopping ends the run before its last step; lorakit runs every step": {"early_stopping_steps": None},
}


def handlers() -> dict[str, Handler]:
    table: dict[str, Handler] = {}
    for why, keys in IGNORED.items():
        table.update({key: ignore(why) for key in keys})
    for why, defaults in AT_DEFAULT.items():
        table.update({key: at_default(default, why) for key, default in defaults.items()})
    return table


def hf_trainer_handlers() -> dict[str, Handler]:
    """The rest of HF's Seq2SeqTrainingArguments (as installed: LLaMA-Factory parses YAML into it), none of
    which changes what is trained once the keys above and llamafactory.py's are taken out."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    return {f.name: ignore(_TRAINER) for f in dataclasses.fields(Seq2SeqTrainingArguments)}
