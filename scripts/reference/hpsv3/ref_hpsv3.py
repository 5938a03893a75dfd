"""Reference HPSv3 (the hpsv3 1.0.0 package, transformers 4.45.2) on a checkpoint in the released layout, offline.
usage: ref_hpsv3.py score CKPT BASE PROMPT IMG...  -> a JSON list of [mu, log sigma] per image, from one call of
                                                    HPSv3RewardInferencer.reward (float32, CPU), the images batched
       ref_hpsv3.py bench CKPT BASE N            -> times that call on N random 512x512 images
CKPT is an HPSv3.safetensors; BASE a folder standing in for Qwen/Qwen2-VL-7B-Instruct (config.json, weights,
tokenizer, processor files), which the package loads with from_pretrained before CKPT replaces every tensor.
The package's own config (hpsv3/config/HPSv3_7B.yaml) is used with three changes: the base is BASE, and the
model stays in float32 (torch_dtype, bf16) for a CPU comparison."""
import json, os, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import yaml
import hpsv3.inference as inference
from hpsv3 import HPSv3RewardInferencer


def inferencer(ckpt, base):
    with open(os.path.join(inference._MODEL_CONFIG_PATH, "HPSv3_7B.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(model_name_or_path=base, torch_dtype="float32", bf16=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    return HPSv3RewardInferencer(config_path=f.name, checkpoint_path=ckpt, device="cpu")


cmd = sys.argv[1]
if cmd == "score":
    ckpt, base, prompt, paths = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    inf = inferencer(ckpt, base)
    with torch.no_grad():
        rewards = inf.reward(paths, [prompt] * len(paths))
    print(json.dumps([[float(r[0]), float(r[1])] for r in rewards]))
elif cmd == "bench":
    import numpy as np
    from PIL import Image
    ckpt, base, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    inf = inferencer(ckpt, base)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]
    with torch.no_grad():
        inf.reward(imgs[:1], ["warm up"])
        t = time.perf_counter()
        for im in imgs:
            inf.reward([im], ["a photo of a cat on a red sofa"])
        dt = time.perf_counter() - t
    print(json.dumps({"images": n, "seconds": dt, "seconds_per_image": dt / n, "threads": torch.get_num_threads()}))
else:
    sys.exit(__doc__)
