#!/usr/bin/env bash
# The whole product on a laptop CPU in a few minutes: the embedded tiny SDXL, pretrained on a procedural
# world of shapes (it draws "a photo of a red circle on a blue background" at 128 px), learns a subject it has
# never seen (a pink and cyan bullseye, "TOK circle") from six photos, with pivotal tuning and prior
# preservation, via the real training script. Then a before/after grid: same prompts and seeds, base vs LoRA.
# Everything lands in ./demo-output (override: DEMO_DIR=... bash examples/demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo-output}
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} HF_HUB_OFFLINE=1

python -m sdxl_pivotal.tiny --pretrained --output_dir "$DEMO_DIR/tiny-sdxl" --subject_images "$DEMO_DIR/images"

# accelerate launch gives each process one CPU thread unless told otherwise.
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$(nproc)" \
  train_dreambooth_lora_sdxl_advanced.py \
  --pretrained_model_name_or_path "$DEMO_DIR/tiny-sdxl" \
  --dataset_name "$DEMO_DIR/images" --caption_column text \
  --instance_prompt "a photo of TOK circle" \
  --train_text_encoder_ti --text_encoder_lr 1e-3 \
  --with_prior_preservation --class_prompt "a photo of a circle" --class_data_dir "$DEMO_DIR/class-images" \
  --num_class_images 12 --sample_batch_size 6 \
  --validation_prompt "a photo of TOK circle on a green background" --validation_steps 100 \
  --num_validation_images 2 --validation_inference_steps 20 \
  --output_dir "$DEMO_DIR/tok-circle" --overwrite_output_dir \
  --resolution 128 --train_batch_size 2 --repeats 4 --rank 8 \
  --learning_rate 1e-3 --lr_scheduler constant --lr_warmup_steps 10 --snr_gamma 5 \
  --max_train_steps 200 --checkpointing_steps 100 --seed 0 --report_to tensorboard

python -m sdxl_pivotal.quality --model "$DEMO_DIR/tiny-sdxl" --lora "$DEMO_DIR/tok-circle" \
  --instance_dir "$DEMO_DIR/images" --output "$DEMO_DIR/before_after.png"
python examples/generate.py --model "$DEMO_DIR/tiny-sdxl" --lora "$DEMO_DIR/tok-circle" \
  --prompt "a photo of <s0><s1> circle on a green background" --output "$DEMO_DIR/sample.png"
echo "Done: LoRA and embeddings in $DEMO_DIR/tok-circle (model card: $DEMO_DIR/tok-circle/README.md)," \
  "before/after grid $DEMO_DIR/before_after.png, sample $DEMO_DIR/sample.png"
