"""A synthetic GQA-like world: seeded scenes of shapes, the study's six question kinds with answers
correct by construction, task files in the GQA layout, and the tokenizer of the shipped toy LLaVA.
Every question also has a counterfactual image (`counterfactual`: the same scene with only the asked-about
attribute, object or relation changed, so the answer differs) for causal tracing with semantic corruption.

    from jaxflow.world import generate
    generate("toy-gqa", n_per_task=100, seed=0)   # <Task>.csv, images/<img_id>.jpg and <img_id>cf.jpg, scenes.json

or `python -m jaxflow.world toy-gqa --n 100`.
"""

from jaxflow.world.counterfactuals import counterfactual
from jaxflow.world.generate import examples, generate, image_of, load_scenes
from jaxflow.world.questions import COLUMNS, TASKS, Example
from jaxflow.world.scene import Obj, Scene, render

__all__ = ["COLUMNS", "TASKS", "Example", "Obj", "Scene", "counterfactual", "examples", "generate", "image_of",
           "load_scenes", "render"]
