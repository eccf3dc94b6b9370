"""Write one YAML per recipe from configs/demo_smollm2.yaml (the recipe table of issue 27 item 7)."""
import copy, sys, yaml
base = yaml.safe_load(open("/work/main/pipeline/configs/demo_smollm2.yaml"))
base["eval"]["retention_every"] = 25
REPLAY = "/work/recipes/replay_smol/replay-index.json"
def stage2(cfg): return cfg["stages"][1]
def replay(cfg, sqa_w, rep_w):
    s = stage2(cfg); shards = s.pop("train_shards")
    s["sources"] = [{"name": "sqa", "shards": shards, "weight": sqa_w},
                    {"name": "replay", "shards": [REPLAY], "weight": rep_w, "task": "chat"}]
recipes = {}
r = copy.deepcopy(base); recipes["none"] = r
r = copy.deepcopy(base); r["optim"]["lr_scale"] = {"A_t": 0, "A_attn": 0}; recipes["lrscale0"] = r
r = copy.deepcopy(base); r["optim"]["lr_scale"] = {"A_t": 0.1, "A_attn": 0.1}; recipes["lrscale01"] = r
r = copy.deepcopy(base); r["loss"] = {"text_kl": {"weight": 1.0, "where": "all_text"}}; recipes["kl_all"] = r
r = copy.deepcopy(base); replay(r, 7, 1); recipes["replay_1of8"] = r
r = copy.deepcopy(base); replay(r, 3, 1); recipes["replay_1of4"] = r
r = copy.deepcopy(base); replay(r, 3, 1); r["loss"] = {"text_kl": {"weight": 1.0, "where": "text_rows"}}; recipes["replay_1of4_kl"] = r
for name, cfg in recipes.items():
    cfg["name"] = f"recipe_{name}"; cfg["output_dir"] = f"/work/recipes/runs/{name}"
    yaml.safe_dump(cfg, open(f"/work/recipes/{name}.yaml", "w"), sort_keys=False)
print(" ".join(recipes))
