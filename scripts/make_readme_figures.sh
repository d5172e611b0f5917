#!/usr/bin/env bash
# Regenerates docs/figures/ (the README's example figures) from the demo's outputs.
# Run after `bash scripts/demo.sh` in the same folder (uses .venv, datasets/demo, experiments/, results/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh" >/dev/null
OPT=options/demo/test_sr3_yoda_demo.yml
D=datasets/demo
OUT=docs/figures
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
for src in gaussian sift; do
  [ -d "$D/val_attention_$src.lmdb" ] || python scripts/precompute_attention.py --input "$D/val_lr.lmdb" \
      --output "$D/val_attention_$src.lmdb" --source "$src" --no-progress
done
ATT=(--attention edge=$D/val_attention_edge.lmdb --attention sift=$D/val_attention_sift.lmdb
     --attention gaussian=$D/val_attention_gaussian.lmdb)
python scripts/precompute_attention.py --input "$D/val_lr.lmdb" --output "$TMP/prev.lmdb" --source edge \
    --no-progress --previews "$TMP/previews" --preview-count 1
cp "$(ls "$TMP"/previews/*.png | head -1)" "$OUT/attention_preview.png"
python scripts/analysis/ratio_of_diffused_pixels.py --opt $OPT "${ATT[@]}" --out "$TMP/fig4"
python scripts/analysis/refined_area_over_time.py --opt $OPT "${ATT[@]}" --out "$TMP/fig5"
python scripts/analysis/intermediate_steps.py --opt $OPT --num-images 1 --out "$TMP/steps"
python scripts/analysis/error_maps.py --opt $OPT --sr SR3+YODA=results/demo_test_SR3_YODA_x4 --num-images 3 \
    --out "$TMP/err"
# No ImageNet AlexNet here: a randomly initialised one in torchvision's layout shows the plot's mechanics only.
python -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.alexnet().state_dict(), '$TMP/alexnet-owt-7be5be79.pth')"
python scripts/analysis/lpips_per_attention_bin.py --opt $OPT --sr SR3+YODA=results/demo_test_SR3_YODA_x4 \
    --lpips-weights "$TMP/alexnet-owt-7be5be79.pth" --bin-width 0.05 --out "$TMP/lpips"
for d in fig4 fig5 steps err lpips; do
  for f in "$TMP/$d"/*.png; do cp "$f" "$OUT/${d}_$(basename "$f")"; done
done
ls -l "$OUT"
