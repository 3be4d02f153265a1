"""The student edition: solutions become stubs, checks expect exactly the friendly error."""

import nbformat
import pytest

from course_lib.checks import not_attempted_message, stub_message
from course_lib.editions import EditionError, strip_solutions, student_notebook


def notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def code(source, *tags):
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.metadata["tags"] = list(tags)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="solution output\n")]
    return cell


EXERCISE = '''# Exercise 00.1: write mse
def mse(pred, target):
    """Mean squared error."""
    # BEGIN SOLUTION
    diff = pred - target
    return (diff ** 2).mean()
    # END SOLUTION
'''


def test_solutions_become_indented_stubs():
    out = strip_solutions(EXERCISE, "00.1", "nb")
    assert "diff" not in out and "BEGIN" not in out
    assert '    raise NotImplementedError("Exercise 00.1 is not done yet")' in out
    assert out.startswith("# Exercise 00.1") and '"""Mean squared error."""' in out
    compile(out, "stub", "exec")


def test_student_notebook_clears_solution_outputs_and_expects_the_error():
    nb = notebook(code("x = 1"), code(EXERCISE, "exercise"),
                  code("# NBVAL_CHECK_OUTPUT\nchecks.check_mse(mse)", "check"), code("y = 2"))
    student = student_notebook(nb, "00_setup.ipynb")
    assert student.cells[0].outputs == nb.cells[0].outputs
    assert student.cells[1].outputs == []
    check = student.cells[2]
    assert "raises-exception" in check.metadata["tags"]
    assert check.outputs[0]["ename"] == "NotAttempted"
    assert check.outputs[0]["evalue"] == not_attempted_message(stub_message("00.1"))
    assert student.cells[3].source == "y = 2"
    assert "BEGIN SOLUTION" in nb.cells[1].source, "the solution edition is not modified"


@pytest.mark.parametrize("cells, message", [
    ([code("def f():\n    # BEGIN SOLUTION\n    pass\n    # END SOLUTION", "exercise")], "must start with a comment"),
    ([code("# Exercise 01.1: x\n# BEGIN SOLUTION\npass", "exercise")], "never closed"),
    ([code("# Exercise 01.1: x\npass", "exercise")], "no '# BEGIN SOLUTION'"),
    ([code("checks.check_mse(f)", "check")], "must follow an `exercise` cell"),
    ([code("# BEGIN SOLUTION\npass\n# END SOLUTION")], "not tagged `exercise`"),
])
def test_broken_conventions_are_named(cells, message):
    with pytest.raises(EditionError, match=message):
        student_notebook(notebook(*cells), "bad.ipynb")


def test_the_student_edition_tells_ai_assistants_to_tutor_not_solve(tmp_path):
    from course_lib.editions import write_student_edition

    source = tmp_path / "notebooks"
    source.mkdir()
    nb = notebook(code("import course_lib"), code(EXERCISE, "exercise"), code("# NBVAL_CHECK_OUTPUT\ncheck(mse)", "check"))
    nbformat.write(nb, source / "00_setup.ipynb")
    written = write_student_edition(source, tmp_path / "student" / "notebooks")
    assert [p.name for p in written] == ["00_setup.ipynb"]
    agents = (tmp_path / "student" / "AGENTS.md").read_text()
    assert "Do not write exercise solutions" in agents and 'checks.hint("NN.K", level=2)' in agents
    assert "Exercises in this copy: 00.1." in agents
    assert not (source.parent / "AGENTS.md").exists(), "the solution edition gets no such file"


def test_the_points_are_stated_once_in_the_exercise_line():
    from course_lib.editions import exercise_id, state_points

    stated = state_points(EXERCISE, "00.1")
    assert stated.startswith("# Exercise 00.1 (1 point): write mse\n")
    assert state_points(stated, "00.1") == stated, "stating the points twice changes nothing"
    assert exercise_id(nbformat.v4.new_code_cell(stated), "nb") == "00.1"
    assert state_points(EXERCISE.replace("00.1", "01.3"), "01.3").startswith("# Exercise 01.3 (2 points):")


def test_the_grading_source_marks_every_cell_for_nbgrader():
    from course_lib.editions import grading_notebook

    nb = notebook(code("x = 1"), code(EXERCISE, "exercise"), code("# NBVAL_CHECK_OUTPUT\nchecks.check_mse(mse)", "check"))
    source = grading_notebook(nb, "00_setup.ipynb")
    meta = [c.metadata["nbgrader"] for c in source.cells]
    assert [(m["grade_id"], m["solution"], m["grade"], m["locked"]) for m in meta] == [
        ("00_setup-000", False, False, True), ("exercise-00_1", True, False, False), ("check-00_1", False, True, True)]
    assert meta[2]["points"] == 1 and "BEGIN SOLUTION" in source.cells[1].source
    assert "nbgrader" not in nb.cells[0].metadata, "the solution edition is not modified"
    with pytest.raises(EditionError, match="must follow an `exercise` cell"):
        grading_notebook(notebook(code("checks.check_mse(f)", "check")), "bad.ipynb")


def test_an_unknown_lesson_is_named_with_the_known_ones(tmp_path):
    from course_lib.editions import write_grading_source

    with pytest.raises(EditionError, match="there is no lesson '01_atention'; the lessons are: .*01_attention"):
        write_grading_source(["01_atention"], target_dir=tmp_path)


def test_a_file_an_exercise_writes_never_travels_with_an_edition(tmp_path):
    """03.5 writes the student's GPT to my_gpt.py beside the notebook; the solution edition's copy holds the
    solution, so neither the student edition nor the grading source may carry it."""
    from course_lib import editions

    source = tmp_path / "notebooks"
    source.mkdir()
    (source / "my_gpt.py").write_text("SOLUTION = True\n")
    (source / "accelerate_train.py").write_text("print('needed by lesson 10')\n")
    assert [p.name for p in editions._travelling_files(source)] == ["accelerate_train.py"]
