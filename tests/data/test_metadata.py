"""pneumo.data.metadata: the metadata vector from RSNA and standard DICOM values."""

from pneumo.data.metadata import metadata_of, metadata_vector


def test_metadata_vector_reads_rsna_and_standard_values():
    assert metadata_vector("AP", "M", "51") == [1.0, 1.0, 0.51]
    assert metadata_vector("PA", "F", 7.0) == [0.0, 0.0, 0.07]
    assert metadata_vector("", None, "garbled") == [0.5, 0.5, 0.5]  # unknown is neutral, not an error
    assert metadata_vector("LL", "O", 400) == [0.5, 0.5, 0.5]


def test_metadata_of_a_header_mapping():
    assert metadata_of({"ViewPosition": "AP", "PatientSex": "F", "PatientAge": "40"}) == [1.0, 0.0, 0.4]
    assert metadata_of({}) == [0.5, 0.5, 0.5]
