"""Prompt templates and --system-prompt: records -> prompts, and the row errors that name the field."""
from __future__ import annotations

import pytest

from pagedbatch.io import FieldNames, InputRecord, RowError, parse_record
from pagedbatch.io.templates import PromptTemplate, TemplateFieldError

RECORD = {
    "article": "Cats sleep a lot.", "n": 3, "score": 0.25, "ok": True, "tags": ["a", "b"],
    "meta": {"title": "Cats", "items": [1, 2], "author": None}, "turns": [{"text": "hi"}, {"other": 1}],
    "missing_later": None,
}


def render(source: str, record=RECORD) -> str:
    return PromptTemplate(source).render(record)


def test_fields_nested_fields_and_non_string_values_render_as_a_prompt_wants_them():
    assert render("Summarise:\n{{ article }}") == "Summarise:\nCats sleep a lot."
    assert render("{{ n }} {{ score }} {{ ok }} {{ n + 1 }}") == "3 0.25 true 4"
    assert render("{{ tags }} | {{ tags | join(', ') }} | {{ meta.items }}") == '["a", "b"] | a, b | [1, 2]'
    assert render("{{ meta.title }} {{ meta['title'] }} {{ turns[0].text }}") == "Cats Cats hi"
    assert render("{{ meta }}") == '{"title": "Cats", "items": [1, 2], "author": null}'
    assert render("{% for t in tags %}- {{ t }}\n{% endfor %}") == "- a\n- b\n"


@pytest.mark.parametrize("source, message", [
    ("{{ body }}", "field 'body' is missing from the record"),
    ("{{ meta.subtitle }}", "field 'meta.subtitle' is missing from the record"),
    ("{{ turns[1].text }}", "field 'turns[1].text' is missing from the record"),
    ("{% for t in turns %}{{ t.text }}{% endfor %}", "field 'turns[1].text' is missing from the record"),
    ("{{ missing_later }}", "field 'missing_later' is null"),
    ("{{ meta.author }}", "field 'meta.author' is null"),
    ("{{ missing_later | upper }}", "field 'missing_later' is null"),
])
def test_a_missing_or_null_field_fails_the_record_naming_the_field(source, message):
    with pytest.raises(TemplateFieldError) as e:
        render(source)
    assert str(e.value) == message


def test_optional_fields_are_written_with_default_or_is_defined():
    source = "{{ body | default('no body') }}/{{ missing_later | default('none') }}{% if x is defined %}X{% endif %}"
    assert render(source) == "no body/none"


def test_a_template_that_does_not_parse_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--prompt-template: the Jinja2 template does not parse: line 2"):
        PromptTemplate("ok\n{{ article ", "--prompt-template")
    with pytest.raises(ValueError, match="empty"):
        PromptTemplate("  ", "--prompt-template")


def test_the_sandbox_keeps_templates_away_from_python_internals():
    with pytest.raises(TemplateFieldError, match="unsafe"):
        render("{{ article.__class__.__mro__ }}")


# --- parse_record with a template and a system prompt -------------------------


def parse(data, **kw):
    return parse_record(InputRecord(0, data, None), FieldNames(), "jsonl", **kw)


def test_a_template_makes_the_prompt_and_the_record_still_gives_id_and_sampling_fields():
    out = parse({"id": "r1", "article": "Hi", "prompt": "ignored", "max_tokens": 5},
                template=PromptTemplate("Say: {{ article }}"))
    assert (out.id, out.prompt, out.messages, out.sampling, out.source) == ("r1", "Say: Hi", None, {"max_tokens": 5},
                                                                            "template")
    bad = parse({"id": "r2", "title": "x"}, template=PromptTemplate("Say: {{ article }}"))
    assert bad == RowError(0, "r2", "template: field 'article' is missing from the record")
    empty = parse({"article": " "}, template=PromptTemplate("{{ article }}"))
    assert isinstance(empty, RowError) and empty.error == "template: the rendered prompt is empty"


def test_a_system_prompt_makes_text_a_chat_and_goes_first_in_chats_that_lack_one():
    text = parse({"prompt": "Hi"}, system_prompt="Be brief.")
    assert text.prompt is None and text.source == "prompt"
    assert text.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = parse({"messages": [{"role": "user", "content": "Hi"}]}, system_prompt="Be brief.")
    assert [m["role"] for m in chat.messages] == ["system", "user"] and chat.messages[0]["content"] == "Be brief."
    own = parse({"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]},
                system_prompt="Be brief.")
    assert [m["content"] for m in own.messages] == ["Mine.", "Hi"]  # the row's own system message wins
    templated = parse({"a": 1}, template=PromptTemplate("n={{ a }}"), system_prompt="S")
    assert templated.messages[1] == {"role": "user", "content": "n=1"} and templated.source == "template"
    ids = parse({"prompt_token_ids": [1, 2]}, system_prompt="S")
    assert isinstance(ids, RowError) and "'prompt_token_ids': --system-prompt needs a text prompt" in ids.error


# --- values that are not structs, nulls in lists, columns that are not names ----


def test_an_attribute_of_a_string_list_or_number_is_a_missing_field_never_a_method():
    for source, record, message in (
            ("{{ meta.title }}", {"meta": "Cats"}, "field 'meta.title' is missing from the record (meta is a string, "
                                                   "not a struct)"),
            ("{{ meta['title'] }}", {"meta": "Cats"}, "field 'meta.title' is missing from the record (meta is a "
                                                      "string, not a struct)"),
            ("{{ m.t.upper }}", {"m": {"t": "x"}}, "field 'm.t.upper' is missing from the record (m.t is a string, "
                                                   "not a struct)"),
            ("{{ tags.count }}", {"tags": ["a"]}, "field 'tags.count' is missing from the record (tags is a list, "
                                                  "not a struct)"),
            ("{{ tags.first }}", {"tags": ["a"]}, "field 'tags.first' is missing from the record (tags is a list, "
                                                  "not a struct)"),
            ("{{ n.bit_length }}", {"n": 3}, "int value has no field 'bit_length'")):
        with pytest.raises(TemplateFieldError) as e:
            render(source, record)
        assert str(e.value) == message, source
        assert render(source.replace(" }}", " | default('-') }}"), record) == "-"
    # Called, a method is a method; the sandbox still stands.
    assert render("{{ article.upper() }} {{ tags.index('b') }}") == "CATS SLEEP A LOT. 1"
    assert render("{% for t in tags %}{{ loop.index }}{{ loop.cycle('x', 'y') }}{% endfor %}") == "1x2y"
    with pytest.raises(TemplateFieldError, match="unsafe"):
        render("{{ tags.append(3) }}")


def test_a_null_list_element_prints_as_json_null_and_is_null_where_used():
    record = {"items": [1, None], "rows": [{"a": 1}, None]}
    for source in ("{{ items }}", "{{ items | list }}", "{{ items | tojson }}", "{{ items[0:2] }}"):
        assert render(source, record) == "[1, null]", source
    assert render("{{ rows }}", record) == '[{"a": 1}, null]'
    assert render("{% for x in items %}{{ x | default('-') }},{% endfor %}", record) == "1,-,"
    assert render("{{ items | last | default('-') }} {% for x in items[1:] %}{{ x | default('-') }}{% endfor %}",
                  record) == "- -"
    for source, field in (("{% for x in items %}{{ x }}{% endfor %}", "items[1]"), ("{{ items | last }}", "items[1]"),
                          ("{% for x in items[1:] %}{{ x }}{% endfor %}", "items[1:][0]"),
                          ("{% for r in rows %}{{ r.a }}{% endfor %}", "rows[1]")):
        with pytest.raises(TemplateFieldError) as e:
            render(source, record)
        assert str(e.value) == f"field {field!r} is null", source


def test_columns_whose_names_are_not_identifiers_are_reached_through_record():
    record = {"my-field": "a", "first name": "Ann", "in": 2, "meta": {"sub-title": "x"}}
    assert render("{{ record['my-field'] }} {{ record['first name'] }} {{ record['in'] }} "
                  "{{ record.meta['sub-title'] }} {{ meta['sub-title'] }}", record) == "a Ann 2 x x"
    for source, message in (
            ("{{ record['my-feild'] }}", "field 'my-feild' is missing from the record"),
            ("{{ record.meta['no such'] }}", "field \"meta['no such']\" is missing from the record"),
            ("{{ my-field }}", "field 'my' is missing from the record (a column whose name is not an identifier "
                               "is written record['my-field'])")):
        with pytest.raises(TemplateFieldError) as e:
            render(source, record)
        assert str(e.value) == message, source
    assert render("{{ record }}", {"record": "its own column"}) == "its own column"  # a column named record wins
