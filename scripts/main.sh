#!/usr/bin/env bash
# The main job on the built-in default: train the autoencoder (stage 1), the text encoder's contrastive
# pretraining if the config asks for it, the text-conditional latent U-Net (stage 2) on the captioned shapes
# data, and the low-noise expert if the config asks for it, then write a grid of samples.
#   bash scripts/main.sh [key=value ...]        e.g. bash scripts/main.sh output_dir=runs/mine
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
config="${LATENTDIFF_CONFIG:-configs/shapes.yaml}"
# The resolved config's output folder, whether it pretrains its text encoder, and its low-noise expert's steps
# (one line each).
{ read -r output_dir; read -r text_pretraining; read -r expert_steps; } < <(python -m latentdiff.cli config --config "$config" "$@" | python -c '
import sys, yaml
config = yaml.safe_load(sys.stdin)
print(config["output_dir"], config["model"]["text_encoder"]["contrastive_pretraining"],
      config["low_noise_expert"]["max_steps"], sep="\n")')
# accelerate launch gives a single CPU process one thread unless told otherwise: use every core.
threads="${OMP_NUM_THREADS:-$(nproc)}"
launch=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
        --num_cpu_threads_per_process "$threads")
start=$(date +%s)
"${launch[@]}" training/train_vae.py --config "$config" "$@"
if [ "$text_pretraining" = True ]; then  # model.text_encoder.contrastive_pretraining: the text encoder's own stage
    "${launch[@]}" training/train_text.py --config "$config" "$@"
fi
"${launch[@]}" training/train_ldm.py --config "$config" "$@"
if [ "$expert_steps" != 0 ]; then  # low_noise_expert.max_steps: stage 2's U-Net fine-tuned on the low noise levels
    "${launch[@]}" training/train_low_noise_expert.py --config "$config" "$@"
fi
end=$(date +%s)
echo
echo "[latentdiff] done in $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
echo "[latentdiff] samples:  $output_dir/pipeline/samples.png"
echo "[latentdiff] pipeline: $output_dir/pipeline   (LatentPipeline.from_pretrained(\"$output_dir/pipeline\"))"
