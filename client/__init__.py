"""The Python client student trainers use to reach teacher and reference services."""

from adpa.client.teacher import IncompatibleTeacher, Teacher, TeacherChanged, check_compatible
from adpa.client.teacher_client import TeacherClient, parse_endpoint

__all__ = ["IncompatibleTeacher", "Teacher", "TeacherChanged", "TeacherClient", "check_compatible", "parse_endpoint"]
