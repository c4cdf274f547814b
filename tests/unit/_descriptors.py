"""Compare kapi's OIP descriptors with tritonclient's by full name: fields, enums, RPCs.

Both sides declare package `inference` (tritonclient in the default descriptor pool, kapi in
its own), so a full name identifies the same message on both. Each function returns the
differences it found as readable lines; an empty list means the two agree.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)


def messages_of(file: FileDescriptor) -> dict[str, Descriptor]:
    """Every message of a file by full name, nested ones (map entries included) too."""
    found: dict[str, Descriptor] = {}

    def visit(message: Descriptor) -> None:
        found[message.full_name] = message
        for nested in message.nested_types:
            visit(nested)

    for message in file.message_types_by_name.values():
        visit(message)
    return found


def enums_of(file: FileDescriptor) -> dict[str, EnumDescriptor]:
    found = {enum.full_name: enum for enum in file.enum_types_by_name.values()}
    for message in messages_of(file).values():
        found.update({enum.full_name: enum for enum in message.enum_types})
    return found


def field_shape(field: FieldDescriptor) -> dict[str, object]:
    """What of a field decides its encoding and its meaning on the wire."""
    return {
        "number": field.number,
        "type": field.type,
        "repeated": field.is_repeated,
        "packed": field.is_packed,
        "message": field.message_type.full_name if field.message_type else None,
        "enum": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


def message_differences(ours: Descriptor, theirs: Descriptor) -> Iterator[str]:
    our_fields, their_fields = ours.fields_by_name, theirs.fields_by_name
    for name in sorted(set(our_fields) & set(their_fields)):
        mine, other = field_shape(our_fields[name]), field_shape(their_fields[name])
        for key in mine:
            if mine[key] != other[key]:
                yield f"{ours.full_name}.{name}: {key} is {mine[key]}, Triton's is {other[key]}"
    their_numbers = {field.number: field.name for field in theirs.fields}
    for field in ours.fields:
        other_name = their_numbers.get(field.number)
        if other_name is not None and other_name != field.name:
            yield (
                f"{ours.full_name}: number {field.number} is '{field.name}', "
                f"Triton's is '{other_name}'"
            )


def enum_differences(ours: EnumDescriptor, theirs: EnumDescriptor) -> Iterator[str]:
    their_values = {value.name: value.number for value in theirs.values}
    for value in ours.values:
        if value.name in their_values and their_values[value.name] != value.number:
            yield (
                f"{ours.full_name}.{value.name} is {value.number}, "
                f"Triton's is {their_values[value.name]}"
            )
    their_names = {value.number: value.name for value in theirs.values}
    for value in ours.values:
        other = their_names.get(value.number)
        if other is not None and other != value.name:
            yield f"{ours.full_name}: value {value.number} is '{value.name}', Triton's is '{other}'"


def file_differences(ours: FileDescriptor, theirs: FileDescriptor) -> list[str]:
    """Every disagreement between what both files define (what only one defines is not one)."""
    found: list[str] = []
    our_messages, their_messages = messages_of(ours), messages_of(theirs)
    for name in sorted(our_messages.keys() & their_messages.keys()):
        found.extend(message_differences(our_messages[name], their_messages[name]))
    our_enums, their_enums = enums_of(ours), enums_of(theirs)
    for name in sorted(our_enums.keys() & their_enums.keys()):
        found.extend(enum_differences(our_enums[name], their_enums[name]))
    return found


def missing_fields(ours: FileDescriptor, theirs: FileDescriptor) -> list[str]:
    """Messages, fields and enum values Triton's file defines and ours does not."""
    missing: list[str] = []
    our_messages = messages_of(ours)
    for name, message in messages_of(theirs).items():
        if name not in our_messages:
            missing.append(name)
            continue
        known = our_messages[name].fields_by_name
        missing.extend(
            f"{name}.{field.name}" for field in message.fields if field.name not in known
        )
    our_enums = enums_of(ours)
    for name, enum in enums_of(theirs).items():
        known_values = our_enums[name].values_by_name if name in our_enums else {}
        missing.extend(
            f"{name}.{value.name}" for value in enum.values if value.name not in known_values
        )
    return missing


def service_differences(ours: ServiceDescriptor, theirs: ServiceDescriptor) -> list[str]:
    """Each of Triton's RPCs must exist in ours with the same types and streaming flags."""
    found: list[str] = []
    for method in theirs.methods:
        mine = ours.methods_by_name.get(method.name)
        if mine is None:
            found.append(f"{ours.full_name} lacks rpc {method.name}")
            continue
        for attribute in ("client_streaming", "server_streaming"):
            if getattr(mine, attribute) != getattr(method, attribute):
                found.append(f"rpc {method.name}: {attribute} differs from Triton's")
        for attribute in ("input_type", "output_type"):
            if getattr(mine, attribute).full_name != getattr(method, attribute).full_name:
                found.append(f"rpc {method.name}: {attribute} differs from Triton's")
    return found
