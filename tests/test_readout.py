"""Yes/no readout: batched equals one-by-one, logsumexp over variants, single-token checks."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, QUESTIONS, make_image
from mechmed.errors import MechmedError
from mechmed.readout import answer_token_ids, build_inputs, margins


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_margins_equal_one_by_one(tiny_bundles, name):
    b = tiny_bundles[name]
    images = [make_image(i) for i in range(len(QUESTIONS))] if b.multimodal else None
    batched = margins(b, QUESTIONS, images, batch_size=len(QUESTIONS))
    single = torch.cat([margins(b, [q], None if images is None else [im])
                        for q, im in zip(QUESTIONS, images or [None] * len(QUESTIONS))])
    # left padding + attention mask: same numbers up to float32 reduction order
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_margin_is_logsumexp_difference_at_last_position(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    images = [make_image(7)]
    inputs = build_inputs(b.processor, QUESTIONS[:1], images)
    assert inputs["input_ids"][0, 0].item() == b.tokenizer.bos_token_id  # one <bos>, not two
    assert (inputs["input_ids"][0] == b.tokenizer.bos_token_id).sum() == 1
    with torch.no_grad():
        full = b.model(**inputs).logits[0, -1]
    yes = torch.logsumexp(full[list(b.answers.yes_ids)], 0)
    no = torch.logsumexp(full[list(b.answers.no_ids)], 0)
    torch.testing.assert_close(margins(b, QUESTIONS[:1], images)[0], yes - no, atol=1e-5, rtol=0)


def test_answer_word_must_be_one_token(tiny_bundles):
    tok = tiny_bundles["Gemma3ForConditionalGeneration"].tokenizer
    ans = answer_token_ids(tok, ("yes", "no"))
    assert ans.yes_ids == (tok.convert_tokens_to_ids("yes"),)
    with pytest.raises(MechmedError, match="not one"):
        answer_token_ids(tok, ("yes", "absolutely-not maybe"))
    with pytest.raises(MechmedError, match="not one"):
        answer_token_ids(tok, ("yes", "zzzunknownword"))  # maps to <unk>
    with pytest.raises(MechmedError, match="exactly two"):
        answer_token_ids(tok, ("yes",))


def test_variants_combined_with_a_case_sensitive_tokenizer():
    """'yes', 'Yes' and 'YES' are distinct tokens in a case-sensitive vocabulary: all count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "yes": 1, "Yes": 2, "YES": 3, "no": 4, "No": 5, "maybe": 6}
    bk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    bk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=bk, unk_token="<unk>")
    ans = answer_token_ids(tok, ("yes", "no"))
    assert set(ans.yes_ids) == {1, 2, 3}
    assert set(ans.no_ids) == {4, 5}
    logits = torch.zeros(1, 7)
    logits[0, 1], logits[0, 2] = 1.0, 2.0
    from mechmed.readout import yes_no_logits

    got = yes_no_logits(logits, ans)
    # by hand: log(e^1 + e^2 + e^0) and log(e^0 + e^0)
    torch.testing.assert_close(got[0], torch.tensor([torch.tensor([1.0, 2.0, 0.0]).exp().sum().log().item(),
                                                     torch.tensor(2.0).log().item()]))


def test_empty_and_mismatched_inputs(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    with pytest.raises(MechmedError, match="empty"):
        build_inputs(b.processor, [], [])
    with pytest.raises(MechmedError, match="one image per question"):
        build_inputs(b.processor, QUESTIONS[:2], [make_image(0)])


def test_a_model_without_a_chat_template_gets_the_plain_prompt(tiny_bundles):
    """A base checkpoint's tokenizer has no chat template: the prompt is PLAIN_TEMPLATE after one
    BOS, and the margin is the logsumexp difference of a plain forward of that text."""
    import copy

    from mechmed.models import ModelBundle
    from mechmed.readout import PLAIN_TEMPLATE, prompt_format, prompt_texts

    ref = tiny_bundles["Gemma3ForCausalLM"]
    tok = copy.deepcopy(ref.tokenizer)
    tok.chat_template = None
    b = ModelBundle(ref.model, tok, ref.family, ref.answers, "base")
    assert prompt_format(tok) == {"kind": "plain", "template": PLAIN_TEMPLATE}
    (text,) = prompt_texts(tok, QUESTIONS[:1], False)
    assert text == tok.bos_token + PLAIN_TEMPLATE.format(question=QUESTIONS[0])
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    inputs = build_inputs(tok, QUESTIONS[:1])
    assert torch.equal(inputs["input_ids"], ids["input_ids"])  # BOS once, then the plain text
    with torch.no_grad():
        full = b.model(**ids).logits[0, -1]
    want = torch.logsumexp(full[list(b.answers.yes_ids)], 0) - torch.logsumexp(full[list(b.answers.no_ids)], 0)
    torch.testing.assert_close(margins(b, QUESTIONS[:1])[0], want, atol=1e-5, rtol=0)
    assert b.provenance["prompt_format"]["kind"] == "plain"


def test_prompt_template_replaces_the_chat_template(tiny_bundles):
    """--prompt-template: {question} filled in; {image} becomes the processor's image marker, which
    it expands into the image's tokens; a template without {image} refuses pairs with images."""
    import copy

    from mechmed.readout import check_template, prompt_format, prompt_texts, set_prompt_template

    vlm = tiny_bundles["Gemma3ForConditionalGeneration"]
    proc = set_prompt_template(copy.copy(vlm.processor), "{image} Finding? {question} Reply:")
    assert prompt_format(proc) == {"kind": "custom", "template": "{image} Finding? {question} Reply:"}
    (text,) = prompt_texts(proc, QUESTIONS[:1], True)
    assert text == f"{proc.tokenizer.bos_token}{proc.boi_token} Finding? {QUESTIONS[0]} Reply:"
    inputs = build_inputs(proc, QUESTIONS[:1], [make_image(1)])
    n_image = int((inputs["input_ids"] == vlm.model.config.image_token_index).sum())
    assert n_image == vlm.model.config.mm_tokens_per_image
    text_only = set_prompt_template(copy.copy(vlm.processor), "Q: {question} A:")
    with pytest.raises(MechmedError, match=r"has no \{image\}"):
        build_inputs(text_only, QUESTIONS[:1], [make_image(1)])
    assert prompt_texts(text_only, ["x?"], False) == [f"{proc.tokenizer.bos_token}Q: x? A:"]
    for bad in ("Q: {quest} A:", "{question} {question}", "no placeholder", "{question} {", "{image}{image}{question}"):
        with pytest.raises(MechmedError, match="--prompt-template"):
            check_template(bad)
