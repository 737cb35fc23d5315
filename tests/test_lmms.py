"""lmms.py: the lmms-eval task it writes prompts and scores exactly as this project does (checked by
importing the generated utils.py and feeding it docs, without lmms-eval installed), its YAML
names functions that exist, bad records are refused by file:line, and the printed command
carries the export's own pixel limits."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import data
import demo
import evaluate
import lmms


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory):
    """The demo's synthetic test records, plus records with a verbatim prompt, an open text
    answer and a BLINK-style '(B)' gold answer, in one JSONL file."""
    root = tmp_path_factory.mktemp("lmms")
    splits = demo.make_synthetic(str(root / "data"), n_train=2, n_val=2, n_test=12, seed=5)
    path = root / "data" / "test.jsonl"
    image = json.loads(path.read_text().splitlines()[0])["images"][0]
    extra = [{"images": [image], "question": "Which one?", "choices": ["left", "right"], "answer": "(B)",
              "task": "blink style", "prompt": "Verbatim: which one?\n(A) left\n(B) right"},
             {"images": [image, image], "question": "What colour is the box?", "answer": "red box",
              "task": "open"}]
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    return str(splits["test"])


def load_utils(task_dir):
    spec = importlib.util.spec_from_file_location("livr_lmms_utils", os.path.join(task_dir, "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_docs(task_dir):
    with open(os.path.join(task_dir, "docs.jsonl")) as f:
        return [json.loads(line) for line in f]


# a variety of outputs a model gives: right, wrong, wordy, empty
OUTPUTS = ["A", "B", "(B)", "The answer is B.", "the blue box", "7", "seven", "There are 3 squares",
           "", "red box", "I think it is the red box", "C"]


def test_prompt_images_and_scoring_equal_ours(demo_records, tmp_path):
    task_dir = str(tmp_path / "task")
    lmms.write_task(task_dir, demo_records)
    utils, docs = load_utils(task_dir), read_docs(task_dir)
    records = data.load_dataset(demo_records)
    assert len(docs) == len(records) > 10
    assert any(r.prompt for r in records) and any(not r.choices for r in records)
    results = []
    for i, (doc, record) in enumerate(zip(docs, records)):
        assert utils.doc_to_text(doc) == record.text
        images = utils.doc_to_visual(doc)
        assert len(images) == len(record.images)
        for got, path in zip(images, record.images):
            assert np.array_equal(np.asarray(got), np.asarray(data.to_rgb(path)))
        for output in OUTPUTS:
            item = utils.process_results(doc, [output])
            assert set(item) == set(utils.METRICS)
            assert item["mean_accuracy"]["correct"] == evaluate.score(output, record), (record.where, output)
        # one output per record, as a run gives: the aggregations equal evaluate.accuracy
        output = OUTPUTS[i % len(OUTPUTS)]
        results.append(evaluate.sample_result(i, record, output=output))
    items = [utils.process_results(d, [r["output"]])["mean_accuracy"] for d, r in zip(docs, results)]
    want = evaluate.accuracy(results)
    assert 0 < want["mean"] < 100
    assert utils.mean_accuracy(items) == pytest.approx(want["mean"])
    names = lmms.metric_names(want["accuracy"])
    for task, acc in want["accuracy"].items():
        assert getattr(utils, names[task])(items) == pytest.approx(acc)


class FunctionLoader(yaml.SafeLoader):
    """YAML as lmms-eval reads a task: `!function utils.name` tags, kept as the name."""


FunctionLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_yaml_parses_and_names_existing_functions(demo_records, tmp_path):
    task_dir = str(tmp_path / "task")
    path = lmms.write_task(task_dir, demo_records, max_new_tokens=12)
    with open(path) as f:
        task = yaml.load(f, Loader=FunctionLoader)
    utils = load_utils(task_dir)
    refs = [v for v in task.values() if isinstance(v, tuple)]
    refs += [m["aggregation"] for m in task["metric_list"]]
    assert len(refs) == 4 + len(task["metric_list"])
    for kind, name in refs:
        module, fn = name.split(".")
        assert kind == "function" and module == "utils" and callable(getattr(utils, fn)), name
    assert [m["metric"] for m in task["metric_list"]] == utils.METRICS
    assert task["task"] == lmms.TASK and task["output_type"] == "generate_until"
    assert task["generation_kwargs"]["max_new_tokens"] == 12 and task["generation_kwargs"]["do_sample"] is False
    assert task["dataset_path"] == "json"
    assert task["dataset_kwargs"]["data_files"]["test"] == os.path.join(os.path.abspath(task_dir), "docs.jsonl")


def test_utils_is_standalone(demo_records, tmp_path):
    """lmms-eval imports utils.py from the task directory alone: no module of this project may
    be needed (run with -I, so neither the repository nor PYTHONPATH is on the path)."""
    task_dir = tmp_path / "task"
    lmms.write_task(str(task_dir), demo_records)
    doc = read_docs(str(task_dir))[0]
    code = ("import json, sys, utils; doc = json.loads(sys.argv[1]); "
            "print(json.dumps([utils.doc_to_text(doc), utils.process_results(doc, [doc['answer']])"
            "['mean_accuracy']['correct'], sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); {code}",
                          json.dumps(doc)], cwd=task_dir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text, correct, modules = json.loads(out.stdout)
    assert text == data.load_dataset(demo_records)[0].text and correct is True
    assert not {"data", "evaluate", "masks", "model", "lmms", "torch"} & set(modules)


def test_bad_records_are_refused_by_line(demo_records, tmp_path, capsys):
    bad = os.path.join(os.path.dirname(demo_records), "bad.jsonl")
    lines = open(demo_records).read().splitlines()[:3]
    lines.insert(1, json.dumps({"images": ["nowhere.png"], "question": "q?", "choices": ["x", "y"], "answer": "A"}))
    with open(bad, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(lmms.TaskError, match=r"bad\.jsonl:2: image not found"):
        lmms.write_task(str(tmp_path / "t"), bad)
    llava = tmp_path / "llava.jsonl"
    image = json.loads(lines[0])["images"][0]
    llava.write_text(json.dumps({"images": [os.path.join(os.path.dirname(demo_records), image)],
                                 "question": "Look <image> here", "answer": "3"}) + "\n")
    with pytest.raises(lmms.TaskError, match=r"llava\.jsonl:1: an <image> placeholder"):
        lmms.write_task(str(tmp_path / "t"), str(llava))
    # through evaluate.py's CLI: one line, exit 2
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--lmms-task", str(tmp_path / "t"), "--data", bad])
    assert e.value.code == 2
    assert "bad.jsonl:2: image not found" in capsys.readouterr().err


def test_cli_writes_the_task(demo_records, tmp_path, capsys):
    out = evaluate.main(["--lmms-task", str(tmp_path / "t"), "--data", demo_records, "--limit", "3"])
    assert os.path.exists(out["lmms_task"]) and len(read_docs(str(tmp_path / "t"))) == 3
    assert "python lmms.py command OUT --task-dir" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["min_max", "size"])
def test_command_carries_the_exports_pixel_limits(tmp_path, form):
    """Both forms of preprocessor_config.json (Qwen2.5-VL's min/max_pixels, transformers 5's
    size.shortest/longest_edge): the command passes exactly the limits our processor reads."""
    export = tmp_path / "hub"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    cfg = ({"min_pixels": 1234, "max_pixels": 56789} if form == "min_max" else
           {"size": {"shortest_edge": 1234, "longest_edge": 56789}})
    (export / "preprocessor_config.json").write_text(json.dumps(cfg))
    c = data.ImageConfig.from_pretrained(export)
    assert (c.min_pixels, c.max_pixels) == (1234, 56789)
    cmd = lmms.command(str(export), "TASKS")
    assert f"pretrained={export},min_pixels=1234,max_pixels=56789,device_map=cpu" in cmd
    assert "--model qwen2_5_vl" in cmd and "--device cpu" in cmd and "--include_path TASKS" in cmd
    gpu = lmms.command(str(export), "TASKS", device="cuda")
    assert "device_map=auto" in gpu and "--device cuda" in gpu
    card = lmms.card_section(str(export), "OUT")
    assert "pretrained=OUT,min_pixels=1234,max_pixels=56789,device_map=cpu" in card
    for trap in ("bf16", "eos_token_id", "exits with status 0", "Note: You only need", "Qwen2VLChat", "2_5"):
        assert trap in card, trap


def test_compare_matches_lmms_samples_to_our_results(demo_records, tmp_path):
    """`lmms.py compare`: lmms-eval's --log_samples rows (doc_id into docs.jsonl) against
    evaluate.py's results.json, by record id, whatever order either is in."""
    task_dir = str(tmp_path / "task")
    lmms.write_task(task_dir, demo_records)
    docs = read_docs(task_dir)
    records = data.load_dataset(demo_records)
    results = [evaluate.sample_result(i, r, output=OUTPUTS[i % len(OUTPUTS)]) for i, r in enumerate(records)]
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"checkpoints": [{"name": "x", "samples": results[::-1]}]}, f)
    rows = [{"doc_id": i, "filtered_resps": [" " + r["output"] + "\n"]} for i, r in enumerate(results)]
    rows[3]["filtered_resps"] = ["something else"]
    with open(tmp_path / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[::-1])
    same, total, differ = lmms.compare(str(tmp_path / "samples.jsonl"), str(tmp_path / "results.json"), task_dir)
    assert (same, total) == (len(docs) - 1, len(docs))
    assert differ == [(docs[3]["id"], "something else", results[3]["output"])]
    # results of other data: refused, not silently compared
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"checkpoints": [{"name": "x", "samples": [{**r, "id": "other"} for r in results]}]}, f)
    with pytest.raises(lmms.TaskError, match="same data file"):
        lmms.compare(str(tmp_path / "samples.jsonl"), str(tmp_path / "results.json"), task_dir)
