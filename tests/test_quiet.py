"""llava_getok.quiet drops exactly the messages it lists (as the libraries write them) and nothing else."""
import logging
import warnings

from llava_getok import quiet

TOWER = ("Some weights of the model checkpoint at /tmp/m were not used when initializing LlavaLlamaForCausalLM: "
         "['model.vision_tower.vision_tower.vision_model.embeddings.class_embedding', "
         "'model.vision_tower.vision_tower.vision_model.post_layernorm.weight']")
EXPECTED = "- This IS expected if you are initializing LlavaLlamaForCausalLM from the checkpoint of a model trained ..."
NOT_EXPECTED = "- This IS NOT expected if you are initializing LlavaLlamaForCausalLM from the checkpoint of a model ..."


class Keep(logging.Handler):
    """Records that reach a logger's handlers (transformers' loggers do not propagate to the root's)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_listed_log_messages_are_dropped_at_their_loggers_and_others_pass():
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    assert sum(isinstance(f, quiet._Drop) for f in logging.getLogger("DeepSpeed").filters) == 1
    bnb, weights = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("transformers.modeling_utils")
    kept = Keep()
    for logger in (bnb, weights):
        logger.addHandler(kept)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        bnb.warning("some other bitsandbytes warning")
        weights.warning(TOWER + "\n" + EXPECTED + "\n" + NOT_EXPECTED)
        weights.warning(TOWER.replace("model.vision_tower.vision_tower.vision_model.post_layernorm.weight", "lm_head.weight"))
    finally:
        for logger in (bnb, weights):
            logger.removeHandler(kept)
    assert [m[:30] for m in kept.messages] == ["some other bitsandbytes warnin", "Some weights of the model chec"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()  # after simplefilter: its filter comes first again
        warnings.warn("`tokenizer` is deprecated and will be removed in version 5.0.0 for `GETokTrainer.__init__`. "
                      "Use `processing_class` instead.", FutureWarning)
        warnings.warn("`foo` is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["`foo` is deprecated"]


def test_line_filter_drops_the_lines_of_another_process_and_the_lines_that_belong_to_them():
    lines = [
        "[2026-12-02 19:07:44,682] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
        "If you have GPU or other accelerator, we were unable to detect it.",
        TOWER, EXPECTED, NOT_EXPECTED,
        "Formatting inputs...Skip in lazy mode",
        "GETok: grid 8, rounds 1, mode inline: 82 tokens",
        "- This IS a line of the user's own, after a kept one",
        "Some weights of LlavaLlamaForCausalLM were not initialized from the model checkpoint at /m and are newly "
        "initialized: ['model.mm_projector.0.weight']",
        "You should probably TRAIN this model on a down-stream task to be able to use it for predictions and inference.",
    ]
    f = quiet.LineFilter()
    assert [line for line in lines if f.keep(line)] == lines[5:]
    assert quiet.python_warnings_option() == "ignore:`tokenizer` is deprecated and will be removed in version 5.0.0:FutureWarning"
