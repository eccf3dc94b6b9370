"""Reader for MME's released layout (MME_Benchmark_release_version/).

One folder per subtask. Two layouts occur in the release:
- flat: ``<subtask>/<name>.jpg|png`` next to ``<subtask>/<name>.txt`` (existence, count, position, color, OCR,
  the cognition subtasks);
- split: ``<subtask>/images/<name>.jpg`` and ``<subtask>/questions_answers_YN/<name>.txt`` (artwork, celebrity,
  landmark, posters, scene; the folder name is the release's, plural 'answers').
Each txt line is ``question<TAB>Yes|No`` (two questions per image). Lines of the form
``image_name<TAB>question<TAB>Yes|No`` (eval_tool's ground-truth format) are accepted too; then the image is
looked up by that name in the subtask's image folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
QA_DIR = "questions_answers_YN"  # the split layout's question folder, as MME_Benchmark_release_version names it
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image_name: str  # file name as MME's eval_tool writes it (e.g. "000000006040.jpg")
    image_path: Path
    question: str
    answer: str  # "yes" | "no" (lower case, as calculation.py compares)


def _find_image(folder: Path, stem_or_name: str, txt: Path) -> Path:
    direct = folder / stem_or_name
    if direct.suffix and direct.is_file():
        return direct
    for suffix in IMAGE_SUFFIXES:
        cand = folder / (stem_or_name + suffix)
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{txt}: no image '{stem_or_name}[{'|'.join(IMAGE_SUFFIXES)}]' in {folder}")


def _read_txt(txt: Path, image_dir: Path, subtask: str) -> list[MMEQuestion]:
    out = []
    for lineno, raw in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        fields = raw.rstrip("\r\n").split("\t")
        if len(fields) == 2:
            image = _find_image(image_dir, txt.stem, txt)
            question, answer = fields
        elif len(fields) == 3:
            image = _find_image(image_dir, fields[0], txt)
            question, answer = fields[1], fields[2]
        else:
            raise ValueError(f"{txt}:{lineno}: expected 'question<TAB>Yes|No' (or with image name first), got {raw!r}")
        answer = answer.strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{txt}:{lineno}: answer {answer!r} is not Yes/No")
        out.append(MMEQuestion(subtask, image.name, image, question.strip(), answer))
    return out


def load_subtask(folder: Path) -> list[MMEQuestion]:
    """All questions of one subtask folder, in a stable order (sorted file names)."""
    folder = Path(folder)
    qa_dir, img_dir = folder / QA_DIR, folder / "images"
    if qa_dir.is_dir():
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{folder}: has {QA_DIR}/ but no images/ folder")
        txts, image_dir = sorted(qa_dir.glob("*.txt")), img_dir
    else:
        txts, image_dir = sorted(folder.glob("*.txt")), folder
    if not txts:
        raise FileNotFoundError(f"{folder}: no question files (*.txt, or {QA_DIR}/*.txt)")
    questions = []
    for txt in txts:
        questions.extend(_read_txt(txt, image_dir, folder.name))
    return questions


def load_mme(root: str | Path, subtasks: list[str] | None = None) -> list[MMEQuestion]:
    """Questions of every known subtask under ``root`` (or only ``subtasks``); error if none is there."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME root {root} is not a directory (expected MME_Benchmark_release_version/)")
    wanted = list(subtasks) if subtasks else [t for t in PERCEPTION + COGNITION if (root / t).is_dir()]
    if not wanted:
        raise FileNotFoundError(f"{root}: none of the MME subtask folders {PERCEPTION + COGNITION} found")
    questions = []
    for task in wanted:
        if not (root / task).is_dir():
            raise FileNotFoundError(f"{root}: subtask folder '{task}' missing")
        questions.extend(load_subtask(root / task))
    return questions
