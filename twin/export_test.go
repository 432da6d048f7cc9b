package twin

import "fmt"

// For the tests of package twin_test, which write values by hand.

// StoreValue returns v, a value of key k written as JSON (the encoding of
// store format 1), in the encoding this build writes.
func StoreValue(k, v []byte) []byte {
	var conv func([]byte) ([]byte, error)
	switch {
	case len(k) > 6 && string(k[:2]) == "s/" && k[5] == 't':
		conv = convertRecord
	case len(k) > 6 && string(k[:2]) == "s/" && k[5] == 'c':
		conv = convertCommand
	case len(k) > 6 && string(k[:2]) == "s/" && k[5] == 'x':
		conv = convertRuleState
	case string(k[:2]) == "l/":
		conv = convertEvent
	default:
		panic(fmt.Sprintf("StoreValue: key %q holds no encoded value", k))
	}
	b, err := conv(v)
	if err != nil {
		panic(err)
	}
	return b
}

// StoredRecordJSON returns a stored twin record as JSON, for a test to edit
// and store again with StoreValue.
func StoredRecordJSON(v []byte) []byte {
	r, err := decodeRecord(v)
	if err != nil {
		panic(err)
	}
	return encodeRecordJSON(r)
}
