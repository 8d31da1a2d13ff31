"""The Python client student trainers use to reach teacher and reference services."""

from adpa.client.teacher import IncompatibleTeacher, Teacher, check_compatible
from adpa.client.teacher_client import TeacherClient, parse_endpoint

__all__ = ["IncompatibleTeacher", "Teacher", "TeacherClient", "check_compatible", "parse_endpoint"]
