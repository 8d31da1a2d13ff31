"""The Python client student trainers use to reach teacher and reference services."""

from adpa.client.teacher_client import IncompatibleTeacher, TeacherClient, check_compatible, parse_endpoint

__all__ = ["IncompatibleTeacher", "TeacherClient", "check_compatible", "parse_endpoint"]
