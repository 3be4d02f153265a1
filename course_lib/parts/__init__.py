"""What the lessons build: each module is the reference of one lesson's mechanism.

Students write these themselves in the notebooks; the checks compare their versions with these, and
later lessons fall back to these where a student's version is missing. This layer imports only
``course_lib.tools``.
"""
