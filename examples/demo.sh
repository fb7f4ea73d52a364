#!/usr/bin/env bash
# The whole product on a laptop CPU in a few minutes: build the embedded tiny SDXL and the demo photos,
# train a DreamBooth LoRA on them with the real training script, then generate a sample with the LoRA.
# Everything lands in ./demo-output (override: DEMO_DIR=... bash examples/demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo-output}
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} HF_HUB_OFFLINE=1

python -m sdxl_pivotal.tiny --output_dir "$DEMO_DIR/tiny-sdxl" --demo_images "$DEMO_DIR/images"

# accelerate launch gives each process one CPU thread unless told otherwise.
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$(nproc)" \
  train_dreambooth_lora_sdxl_advanced.py \
  --pretrained_model_name_or_path "$DEMO_DIR/tiny-sdxl" \
  --dataset_name "$DEMO_DIR/images" --caption_column text \
  --instance_prompt "a photo of TOK toy figure" \
  --train_text_encoder_ti --text_encoder_lr 1e-3 \
  --with_prior_preservation --class_prompt "a photo of a toy figure" --class_data_dir "$DEMO_DIR/class-images" \
  --num_class_images 6 --sample_batch_size 3 \
  --validation_prompt "a photo of TOK toy figure, blue background" --validation_steps 30 \
  --num_validation_images 2 --validation_inference_steps 10 \
  --output_dir "$DEMO_DIR/tok-toy" --overwrite_output_dir \
  --resolution 128 --random_flip --train_batch_size 2 --repeats 4 \
  --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 5 --snr_gamma 5 \
  --max_train_steps 60 --checkpointing_steps 30 --seed 0 --report_to tensorboard

python examples/generate.py --model "$DEMO_DIR/tiny-sdxl" --lora "$DEMO_DIR/tok-toy" \
  --prompt "a photo of <s0><s1> toy figure, blue background" --output "$DEMO_DIR/sample.png"
echo "Done: LoRA and embeddings in $DEMO_DIR/tok-toy (model card: $DEMO_DIR/tok-toy/README.md), sample $DEMO_DIR/sample.png"
