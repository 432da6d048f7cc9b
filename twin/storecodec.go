package twin

import (
	"errors"
	"fmt"
	"math"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// The values of store format 2 are written and read here, by hand, in the
// protobuf wire format of proto/twin/store/v1/store.proto, which documents
// them. Each value is the byte storeEncoding and one message: a Record for
// a twin's key, a Command, a RuleState, an Event for a watch log entry.
//
// Written by hand rather than through the generated code: a twin's
// documents go straight from their maps to bytes and back, with no message
// tree in between, and the metadata of each leaf rides inline with the
// leaf. storecodec_test.go measures both ways and checks that the generated
// code reads what this writes, and the other way round.
//
// The readers also accept the JSON of store format 1 (storejson.go), told
// apart by the first byte: a store being converted (convert.go) holds both.

// storeEncoding is the first byte of every value in store format 2. No JSON
// value starts with it.
const storeEncoding byte = 0x01

// isBinary reports whether a stored value is in the encoding of format 2
// rather than the JSON of format 1.
func isBinary(v []byte) bool { return len(v) > 0 && v[0] == storeEncoding }

// Field numbers of store.proto.
const (
	recordTwin     protowire.Number = 1
	recordDeletion protowire.Number = 2
	recordLogBase  protowire.Number = 3
	recordLogChain protowire.Number = 4

	deletionLastVersion    protowire.Number = 1
	deletionLastCommandSeq protowire.Number = 2

	twinID                  protowire.Number = 1
	twinType                protowire.Number = 2
	twinLabels              protowire.Number = 3
	twinReported            protowire.Number = 4
	twinDesired             protowire.Number = 5
	twinReportedMeta        protowire.Number = 6
	twinDesiredMeta         protowire.Number = 7
	twinTombstones          protowire.Number = 8
	twinDesiredAckedVersion protowire.Number = 9
	twinVersion             protowire.Number = 10
	twinRevision            protowire.Number = 11
	twinConnected           protowire.Number = 12
	twinConnectedSince      protowire.Number = 13
	twinLastSeen            protowire.Number = 14
	twinCreateTime          protowire.Number = 15
	twinUpdateTime          protowire.Number = 16
	twinTokenHash           protowire.Number = 17
	twinCommandSeq          protowire.Number = 18

	mapKey   protowire.Number = 1
	mapValue protowire.Number = 2

	pathMetaPath    protowire.Number = 1
	pathMetaTime    protowire.Number = 2
	pathMetaVersion protowire.Number = 3

	objectMembers protowire.Number = 1
	arrayElements protowire.Number = 1

	nodeKey            protowire.Number = 1
	nodeNull           protowire.Number = 2
	nodeBool           protowire.Number = 3
	nodeNumber         protowire.Number = 4
	nodeInteger        protowire.Number = 5
	nodeString         protowire.Number = 6
	nodeArray          protowire.Number = 7
	nodeObject         protowire.Number = 8
	nodeChangedTime    protowire.Number = 9
	nodeChangedVersion protowire.Number = 10

	eventRevision protowire.Number = 1
	eventKind     protowire.Number = 2
	eventTime     protowire.Number = 3
	eventSource   protowire.Number = 4
	eventPatch    protowire.Number = 5
	eventTwin     protowire.Number = 6
	eventChange   protowire.Number = 7

	changePreviousRevision protowire.Number = 1
	changeHead             protowire.Number = 2
	changeReported         protowire.Number = 3
	changeDesired          protowire.Number = 4
	changeSameTypeLabels   protowire.Number = 5
	changeTwinBytes        protowire.Number = 6

	commandID         protowire.Number = 1
	commandDeviceID   protowire.Number = 2
	commandSeq        protowire.Number = 3
	commandName       protowire.Number = 4
	commandParams     protowire.Number = 5
	commandState      protowire.Number = 6
	commandResult     protowire.Number = 7
	commandMessage    protowire.Number = 8
	commandSource     protowire.Number = 9
	commandRequestID  protowire.Number = 10
	commandTTL        protowire.Number = 11
	commandCreateTime protowire.Number = 12
	commandUpdateTime protowire.Number = 13
	commandExpireTime protowire.Number = 14

	ruleStateGen          protowire.Number = 1
	ruleStateActive       protowire.Number = 2
	ruleStatePendingSince protowire.Number = 3
	ruleStateFired        protowire.Number = 4
	ruleStateLastFired    protowire.Number = 5
)

// maxNodeDepth bounds how deeply the reader follows nested values, so that
// a corrupt value cannot recurse without end. Documents nest far less.
const maxNodeDepth = 1000

var errTruncated = errors.New("truncated or malformed field")

// The wire type of each field of a message of store.proto, by field
// number: B length-delimited, V varint, F 64-bit. A field beyond the end
// is one a later format added, which readers skip.
const (
	recordWire    = "-BBVV"
	deletionWire  = "-VV"
	twinWire      = "-BBBBBBBBVVVVFFFFBV"
	labelWire     = "-BB"
	tombstoneWire = "-BV"
	pathMetaWire  = "-BFV"
	nodeWire      = "-BVVFVBBBFV"
	eventWire     = "-VVFBBBB"
	changeWire    = "-VBBBVV"
	commandWire   = "-BBVBBVBBBBVFFF"
	ruleStateWire = "-VVFVF"
)

// checkWire checks that a field has the wire type that store.proto gives
// its number in a message whose types are wire.
func checkWire(wire string, f field) error {
	if int(f.num) >= len(wire) || f.num <= 0 {
		return nil
	}
	want := protowire.BytesType
	switch wire[f.num] {
	case 'V':
		want = protowire.VarintType
	case 'F':
		want = protowire.Fixed64Type
	}
	return f.want(want)
}

// nextFieldOf reads the first field of b, a message whose wire types are
// wire, and returns it and the rest of b.
func nextFieldOf(wire string, b []byte) (field, []byte, error) {
	f, rest, err := nextField(b)
	if err == nil {
		err = checkWire(wire, f)
	}
	return f, rest, err
}

// ---- writing

// openLen appends the tag of a length-delimited field and one byte for its
// length, and returns where its contents start; closeLen writes the length.
func openLen(b []byte, num protowire.Number) ([]byte, int) {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return append(b, 0), len(b) + 1
}

// closeLen writes the length of the field opened at start, moving its
// contents when the length takes more than the one byte kept for it.
func closeLen(b []byte, start int) []byte {
	n := len(b) - start
	if n < 0x80 {
		b[start-1] = byte(n)
		return b
	}
	k := protowire.SizeVarint(uint64(n))
	for range k - 1 {
		b = append(b, 0)
	}
	copy(b[start-1+k:], b[start:start+n])
	protowire.AppendVarint(b[:start-1], uint64(n))
	return b
}

func appendBytesField(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(len(s)))
	return append(b, s...)
}

// appendTextField appends a string that may not be valid UTF-8 (document
// keys and values, device messages): invalid bytes become U+FFFD, as the
// JSON of format 1 wrote them, so that every protobuf reader accepts it.
func appendTextField(b []byte, num protowire.Number, s string) []byte {
	if !utf8.ValidString(s) {
		s = validUTF8(s)
	}
	return appendBytesField(b, num, s)
}

func validUTF8(s string) string {
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		out = utf8.AppendRune(out, r) // RuneError for each invalid byte
		i += size
	}
	return string(out)
}

func appendIntField(b []byte, num protowire.Number, v int64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, uint64(v))
}

func appendBoolField(b []byte, num protowire.Number, v bool) []byte {
	if !v {
		return b
	}
	return append(protowire.AppendTag(b, num, protowire.VarintType), 1)
}

// appendTimeField appends a time as Unix nanoseconds; the zero time is
// left out.
func appendTimeField(b []byte, num protowire.Number, t time.Time) []byte {
	if t.IsZero() {
		return b
	}
	return appendFixed64Field(b, num, uint64(t.UnixNano()))
}

func appendFixed64Field(b []byte, num protowire.Number, v uint64) []byte {
	b = protowire.AppendTag(b, num, protowire.Fixed64Type)
	return protowire.AppendFixed64(b, v)
}

// metaWriter finds the metadata of each member of a document as it is
// written.
type metaWriter struct {
	meta    map[string]FieldMeta
	path    []byte // the JSON Pointer of the member being written
	matched int    // how many entries of meta were written inline
}

// appendObject appends the members of an object (the contents of an
// Object message). mw, if not nil, supplies the members' metadata.
func appendObject(b []byte, m map[string]any, mw *metaWriter) []byte {
	for k, v := range m {
		var start int
		b, start = openLen(b, objectMembers)
		b = appendNode(b, k, v, mw)
		b = closeLen(b, start)
	}
	return b
}

// appendNode appends the fields of a Node.
func appendNode(b []byte, key string, v any, mw *metaWriter) []byte {
	b = appendTextField(b, nodeKey, key)
	n := 0
	if mw != nil {
		n = len(mw.path)
		mw.path = appendPointerKey(append(mw.path, '/'), key)
	}
	b = appendValue(b, v, mw)
	if mw != nil {
		if m, ok := mw.meta[string(mw.path)]; ok {
			mw.matched++
			b = appendFixed64Field(b, nodeChangedTime, uint64(m.Time.UnixNano()))
			b = appendIntField(b, nodeChangedVersion, m.Version)
		}
		mw.path = mw.path[:n]
	}
	return b
}

// appendValue appends the value field of a Node.
func appendValue(b []byte, v any, mw *metaWriter) []byte {
	switch v := v.(type) {
	case nil:
		return append(protowire.AppendTag(b, nodeNull, protowire.VarintType), 0)
	case bool:
		return protowire.AppendVarint(protowire.AppendTag(b, nodeBool, protowire.VarintType), protowire.EncodeBool(v))
	case float64:
		if v == math.Trunc(v) && math.Abs(v) <= 1<<53 && (v != 0 || !math.Signbit(v)) {
			b = protowire.AppendTag(b, nodeInteger, protowire.VarintType)
			return protowire.AppendVarint(b, protowire.EncodeZigZag(int64(v)))
		}
		return appendFixed64Field(b, nodeNumber, math.Float64bits(v))
	case string:
		if v == "" {
			return append(protowire.AppendTag(b, nodeString, protowire.BytesType), 0)
		}
		return appendTextField(b, nodeString, v)
	case []any:
		b, start := openLen(b, nodeArray)
		for _, e := range v {
			var s int
			b, s = openLen(b, arrayElements)
			b = appendValue(b, e, nil)
			b = closeLen(b, s)
		}
		return closeLen(b, start)
	case map[string]any:
		b, start := openLen(b, nodeObject)
		b = appendObject(b, v, mw)
		return closeLen(b, start)
	}
	// Documents hold only the types above; checkValue refuses the rest.
	return append(protowire.AppendTag(b, nodeNull, protowire.VarintType), 0)
}

// appendPointerKey appends a key escaped for a JSON Pointer.
func appendPointerKey[S ~string | ~[]byte](b []byte, k S) []byte {
	for i := 0; i < len(k); i++ {
		switch c := k[i]; c {
		case '~':
			b = append(b, '~', '0')
		case '/':
			b = append(b, '~', '1')
		default:
			b = append(b, c)
		}
	}
	return b
}

// appendDocument appends a twin's document and its metadata: inline with
// each member, and in the PathMeta fields metaNum for paths that name no
// member.
func appendDocument(b []byte, docNum, metaNum protowire.Number, doc Document, meta map[string]FieldMeta) []byte {
	var mw *metaWriter
	if len(meta) > 0 {
		mw = &metaWriter{meta: meta, path: make([]byte, 0, 64)}
	}
	if len(doc) > 0 {
		var start int
		b, start = openLen(b, docNum)
		b = appendObject(b, doc, mw)
		b = closeLen(b, start)
	}
	if mw == nil || mw.matched == len(meta) {
		return b
	}
	for p, m := range meta {
		if p != "" {
			if _, ok := lookup(doc, p); ok {
				continue // written inline
			}
		}
		var start int
		b, start = openLen(b, metaNum)
		b = appendBytesField(b, pathMetaPath, p)
		b = appendFixed64Field(b, pathMetaTime, uint64(m.Time.UnixNano()))
		b = appendIntField(b, pathMetaVersion, m.Version)
		b = closeLen(b, start)
	}
	return b
}

// appendTwinMessage appends the fields of a Twin message.
func appendTwinMessage(b []byte, t *Twin) []byte {
	b = appendBytesField(b, twinID, t.ID)
	b = appendBytesField(b, twinType, t.Type)
	for k, v := range t.Labels {
		var start int
		b, start = openLen(b, twinLabels)
		b = appendTextField(b, mapKey, k)
		b = appendTextField(b, mapValue, v)
		b = closeLen(b, start)
	}
	b = appendDocument(b, twinReported, twinReportedMeta, t.Reported, t.ReportedMeta)
	b = appendDocument(b, twinDesired, twinDesiredMeta, t.Desired, t.DesiredMeta)
	for p, v := range t.Tombstones {
		var start int
		b, start = openLen(b, twinTombstones)
		b = appendBytesField(b, mapKey, p)
		b = appendIntField(b, mapValue, v)
		b = closeLen(b, start)
	}
	b = appendIntField(b, twinDesiredAckedVersion, t.DesiredAckedVersion)
	b = appendIntField(b, twinVersion, t.Version)
	b = appendIntField(b, twinRevision, t.Revision)
	b = appendBoolField(b, twinConnected, t.Presence.Connected)
	b = appendTimeField(b, twinConnectedSince, t.Presence.Since)
	b = appendTimeField(b, twinLastSeen, t.Presence.LastSeen)
	b = appendTimeField(b, twinCreateTime, t.CreateTime)
	b = appendTimeField(b, twinUpdateTime, t.UpdateTime)
	if len(t.TokenHash) > 0 {
		b = protowire.AppendTag(b, twinTokenHash, protowire.BytesType)
		b = protowire.AppendBytes(b, t.TokenHash)
	}
	return appendIntField(b, twinCommandSeq, t.CommandSeq)
}

// appendTwin appends the stored record of a live twin, as encodeRecord
// writes it.
func appendTwin(b []byte, t *Twin) []byte {
	b = append(b, storeEncoding)
	b, start := openLen(b, recordTwin)
	b = appendTwinMessage(b, t)
	return closeLen(b, start)
}

// encodeRecord encodes a twin's record: the twin, or its deletion marker.
func encodeRecord(r record) []byte {
	if !r.Deleted {
		b := appendTwin(make([]byte, 0, 256), r.Twin)
		b = appendIntField(b, recordLogBase, r.Log.Base)
		return appendIntField(b, recordLogChain, r.Log.Chain)
	}
	b := []byte{storeEncoding}
	b, start := openLen(b, recordDeletion)
	b = appendIntField(b, deletionLastVersion, r.LastVersion)
	b = appendIntField(b, deletionLastCommandSeq, r.LastCommandSeq)
	return closeLen(b, start)
}

// twinOfRecord returns the Twin message inside an encoded record of a live
// twin, or false.
func twinOfRecord(rec []byte) ([]byte, bool) {
	if !isBinary(rec) {
		return nil, false
	}
	num, typ, n := protowire.ConsumeTag(rec[1:])
	if n < 0 || num != recordTwin || typ != protowire.BytesType {
		return nil, false
	}
	msg, m := protowire.ConsumeBytes(rec[1+n:])
	if m < 0 {
		return nil, false
	}
	return msg, true
}

// appendEvent appends the stored form of an event whose twin is already
// encoded as tw, a record written by encodeRecord or appendTwin (whose
// Twin message the event takes as it is).
func appendEvent(b []byte, ev *Event, tw []byte) []byte {
	return appendEventTwin(appendEventHead(b, ev), ev, tw)
}

// appendEventHead appends the encoding byte and the fields of an event
// other than its twin.
func appendEventHead(b []byte, ev *Event) []byte {
	b = append(b, storeEncoding)
	b = appendIntField(b, eventRevision, ev.Revision)
	b = appendIntField(b, eventKind, int64(ev.Kind))
	b = appendTimeField(b, eventTime, ev.Time)
	b = appendBytesField(b, eventSource, string(ev.Source))
	if ev.Patch != nil {
		var start int
		b, start = openLen(b, eventPatch)
		b = appendObject(b, ev.Patch, nil)
		b = closeLen(b, start)
	}
	return b
}

// appendEventTwin appends an event's twin, tw or else ev.Twin, to an
// event head.
func appendEventTwin(b []byte, ev *Event, tw []byte) []byte {
	if msg, ok := twinOfRecord(tw); ok {
		b = protowire.AppendTag(b, eventTwin, protowire.BytesType)
		return protowire.AppendBytes(b, msg)
	}
	if ev.Twin != nil {
		var start int
		b, start = openLen(b, eventTwin)
		b = appendTwinMessage(b, ev.Twin)
		b = closeLen(b, start)
	}
	return b
}

// encodeCommand encodes a retained command.
func encodeCommand(c *Command) ([]byte, error) {
	b := make([]byte, 1, 128)
	b[0] = storeEncoding
	b = appendBytesField(b, commandID, c.ID)
	b = appendBytesField(b, commandDeviceID, c.DeviceID)
	b = appendIntField(b, commandSeq, c.Seq)
	b = appendBytesField(b, commandName, c.Name)
	if len(c.Params) > 0 {
		var start int
		b, start = openLen(b, commandParams)
		b = appendObject(b, c.Params, nil)
		b = closeLen(b, start)
	}
	b = appendIntField(b, commandState, int64(c.State))
	if len(c.Result) > 0 {
		var start int
		b, start = openLen(b, commandResult)
		b = appendObject(b, c.Result, nil)
		b = closeLen(b, start)
	}
	b = appendTextField(b, commandMessage, c.Message)
	b = appendBytesField(b, commandSource, string(c.Source))
	b = appendTextField(b, commandRequestID, c.RequestID)
	b = appendIntField(b, commandTTL, int64(c.TTL))
	b = appendTimeField(b, commandCreateTime, c.CreateTime)
	b = appendTimeField(b, commandUpdateTime, c.UpdateTime)
	b = appendTimeField(b, commandExpireTime, c.ExpireTime)
	return b, nil
}

// encodeRuleState encodes a twin's state for a rule.
func encodeRuleState(s *RuleState) ([]byte, error) {
	b := make([]byte, 1, 32)
	b[0] = storeEncoding
	b = appendIntField(b, ruleStateGen, s.Gen)
	b = appendBoolField(b, ruleStateActive, s.Active)
	b = appendTimeField(b, ruleStatePendingSince, s.PendingSince)
	b = appendBoolField(b, ruleStateFired, s.Fired)
	return appendTimeField(b, ruleStateLastFired, s.LastFired), nil
}

// ---- reading

// smallInts holds the small integers as document values, boxed once:
// documents are immutable, so the decoded twins share them rather than
// allocate one per number.
var smallInts = func() (a [1280]any) {
	for i := range a {
		a[i] = float64(int64(i) + smallIntMin)
	}
	return a
}()

const smallIntMin = -256

// field is one field of a message as fieldReader reads it.
type field struct {
	num   protowire.Number
	typ   protowire.Type
	u     uint64 // a varint's or a fixed number's value
	bytes []byte // a length-delimited field's contents
}

// nextField reads the first field of b and returns it and the rest of b.
func nextField(b []byte) (field, []byte, error) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return field{}, nil, errTruncated
	}
	b = b[n:]
	f := field{num: num, typ: typ}
	switch typ {
	case protowire.VarintType:
		f.u, n = protowire.ConsumeVarint(b)
	case protowire.Fixed64Type:
		f.u, n = protowire.ConsumeFixed64(b)
	case protowire.Fixed32Type:
		var v uint32
		v, n = protowire.ConsumeFixed32(b)
		f.u = uint64(v)
	case protowire.BytesType:
		f.bytes, n = protowire.ConsumeBytes(b)
	default:
		n = protowire.ConsumeFieldValue(num, typ, b)
	}
	if n < 0 {
		return field{}, nil, fmt.Errorf("field %d: %w", num, errTruncated)
	}
	return f, b[n:], nil
}

func (f field) int() int64 { return int64(f.u) }

func (f field) time() time.Time { return time.Unix(0, int64(f.u)).UTC() }

// want checks that the field has the wire type its number has in
// store.proto.
func (f field) want(typ protowire.Type) error {
	if f.typ != typ {
		return fmt.Errorf("field %d has wire type %d, not %d", f.num, f.typ, typ)
	}
	return nil
}

// docReader reads documents, collecting the metadata of their members.
type docReader struct {
	meta  map[string]FieldMeta // nil: metadata is not collected
	path  []byte
	depth int
}

// countMembers returns how many members an Object message has.
func countMembers(b []byte) int {
	n := 0
	for len(b) > 0 {
		num, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			return n
		}
		b = b[l:]
		l = protowire.ConsumeFieldValue(num, typ, b)
		if l < 0 {
			return n
		}
		b = b[l:]
		if num == objectMembers {
			n++
		}
	}
	return n
}

// object reads an Object message.
func (d *docReader) object(b []byte) (map[string]any, error) {
	if d.depth++; d.depth > maxNodeDepth {
		return nil, errors.New("documents nest too deeply")
	}
	defer func() { d.depth-- }()
	m := make(map[string]any, countMembers(b))
	for len(b) > 0 {
		f, rest, err := nextField(b)
		if err != nil {
			return nil, err
		}
		b = rest
		if f.num != objectMembers {
			continue
		}
		if err := f.want(protowire.BytesType); err != nil {
			return nil, err
		}
		if err := d.member(f.bytes, m); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// nodeFields is a Node message's fields, read before its value is decoded,
// so that the fields may come in any order.
type nodeFields struct {
	key      []byte
	value    field
	hasValue bool
	meta     FieldMeta
	hasMeta  bool
}

func readNode(b []byte) (nodeFields, error) {
	var n nodeFields
	var t uint64
	for len(b) > 0 {
		f, rest, err := nextFieldOf(nodeWire, b)
		if err != nil {
			return n, err
		}
		b = rest
		switch f.num {
		case nodeKey:
			n.key = f.bytes
		case nodeNull, nodeBool, nodeNumber, nodeInteger, nodeString, nodeArray, nodeObject:
			n.value, n.hasValue = f, true
		case nodeChangedTime:
			t, n.hasMeta = f.u, true
		case nodeChangedVersion:
			n.meta.Version = f.int()
		}
	}
	if !n.hasValue {
		return n, errors.New("a document value has none of the value fields")
	}
	if n.hasMeta {
		n.meta.Time = time.Unix(0, int64(t)).UTC()
	}
	return n, nil
}

// member reads a Node that is a member of an object into m.
func (d *docReader) member(b []byte, m map[string]any) error {
	n, err := readNode(b)
	if err != nil {
		return err
	}
	if d.meta == nil {
		v, err := d.value(n.value)
		if err != nil {
			return err
		}
		m[string(n.key)] = v
		return nil
	}
	l := len(d.path)
	d.path = appendPointerKey(append(d.path, '/'), n.key)
	var key string
	if n.hasMeta {
		p := string(d.path)
		d.meta[p] = n.meta
		if len(d.path)-l-1 == len(n.key) {
			key = p[l+1:] // unescaped: the key is the path's end
		}
	}
	if key == "" {
		key = string(n.key)
	}
	v, err := d.value(n.value)
	if err != nil {
		return err
	}
	m[key] = v
	d.path = d.path[:l]
	return nil
}

// value decodes the value field of a Node.
func (d *docReader) value(f field) (any, error) {
	var typ protowire.Type
	switch f.num {
	case nodeNull, nodeBool, nodeInteger:
		typ = protowire.VarintType
	case nodeNumber:
		typ = protowire.Fixed64Type
	default:
		typ = protowire.BytesType
	}
	if err := f.want(typ); err != nil {
		return nil, err
	}
	switch f.num {
	case nodeNull:
		return nil, nil
	case nodeBool:
		return f.u != 0, nil
	case nodeNumber:
		return math.Float64frombits(f.u), nil
	case nodeInteger:
		i := protowire.DecodeZigZag(f.u)
		if i >= smallIntMin && i < smallIntMin+int64(len(smallInts)) {
			return smallInts[i-smallIntMin], nil
		}
		return float64(i), nil
	case nodeString:
		return string(f.bytes), nil
	case nodeArray:
		return d.array(f.bytes)
	default: // nodeObject
		return d.object(f.bytes)
	}
}

// array reads an Array message. Its elements carry no metadata.
func (d *docReader) array(b []byte) ([]any, error) {
	if d.depth++; d.depth > maxNodeDepth {
		return nil, errors.New("documents nest too deeply")
	}
	defer func() { d.depth-- }()
	meta := d.meta
	d.meta = nil
	defer func() { d.meta = meta }()
	out := make([]any, 0, countMembers(b))
	for len(b) > 0 {
		f, rest, err := nextField(b)
		if err != nil {
			return nil, err
		}
		b = rest
		if f.num != arrayElements {
			continue
		}
		if err := f.want(protowire.BytesType); err != nil {
			return nil, err
		}
		n, err := readNode(f.bytes)
		if err != nil {
			return nil, err
		}
		v, err := d.value(n.value)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// readDocument reads a document without metadata (a patch, a command's
// params or result).
func readDocument(b []byte) (Document, error) {
	var d docReader
	return d.object(b)
}

// readTwinDocument reads a twin's document into *doc and the metadata of
// its members into *meta.
func readTwinDocument(b []byte, doc *Document, meta *map[string]FieldMeta) error {
	if *meta == nil {
		*meta = make(map[string]FieldMeta, countMembers(b))
	}
	d := docReader{meta: *meta, path: make([]byte, 0, 64)}
	m, err := d.object(b)
	if err != nil {
		return err
	}
	*doc = m
	return nil
}

func readPathMeta(b []byte, meta *map[string]FieldMeta) error {
	var p string
	var m FieldMeta
	for len(b) > 0 {
		f, rest, err := nextFieldOf(pathMetaWire, b)
		if err != nil {
			return err
		}
		b = rest
		switch f.num {
		case pathMetaPath:
			p = string(f.bytes)
		case pathMetaTime:
			m.Time = f.time()
		case pathMetaVersion:
			m.Version = f.int()
		}
	}
	if *meta == nil {
		*meta = map[string]FieldMeta{}
	}
	(*meta)[p] = m
	return nil
}

// readMapEntry reads a map entry of a string key and a string (bytes) or
// varint value.
func readMapEntry(wire string, b []byte) (key []byte, value field, err error) {
	for len(b) > 0 {
		f, rest, err := nextFieldOf(wire, b)
		if err != nil {
			return nil, field{}, err
		}
		b = rest
		switch f.num {
		case mapKey:
			key = f.bytes
		case mapValue:
			value = f
		}
	}
	return key, value, nil
}

// readTwin reads a Twin message and computes the twin's delta.
func parseTwin(b []byte) (*Twin, error) {
	t := new(Twin)
	for len(b) > 0 {
		f, rest, err := nextFieldOf(twinWire, b)
		if err != nil {
			return nil, err
		}
		b = rest
		switch f.num {
		case twinID:
			t.ID = string(f.bytes)
		case twinType:
			t.Type = string(f.bytes)
		case twinLabels:
			k, v, err := readMapEntry(labelWire, f.bytes)
			if err != nil {
				return nil, err
			}
			if t.Labels == nil {
				t.Labels = map[string]string{}
			}
			t.Labels[string(k)] = string(v.bytes)
		case twinReported:
			err = readTwinDocument(f.bytes, &t.Reported, &t.ReportedMeta)
		case twinDesired:
			err = readTwinDocument(f.bytes, &t.Desired, &t.DesiredMeta)
		case twinReportedMeta:
			err = readPathMeta(f.bytes, &t.ReportedMeta)
		case twinDesiredMeta:
			err = readPathMeta(f.bytes, &t.DesiredMeta)
		case twinTombstones:
			k, v, err := readMapEntry(tombstoneWire, f.bytes)
			if err != nil {
				return nil, err
			}
			if t.Tombstones == nil {
				t.Tombstones = map[string]int64{}
			}
			t.Tombstones[string(k)] = v.int()
		case twinDesiredAckedVersion:
			t.DesiredAckedVersion = f.int()
		case twinVersion:
			t.Version = f.int()
		case twinRevision:
			t.Revision = f.int()
		case twinConnected:
			t.Presence.Connected = f.u != 0
		case twinConnectedSince:
			t.Presence.Since = f.time()
		case twinLastSeen:
			t.Presence.LastSeen = f.time()
		case twinCreateTime:
			t.CreateTime = f.time()
		case twinUpdateTime:
			t.UpdateTime = f.time()
		case twinTokenHash:
			t.TokenHash = append([]byte(nil), f.bytes...)
		case twinCommandSeq:
			t.CommandSeq = f.int()
		}
		if err != nil {
			return nil, err
		}
	}
	if t.Reported == nil {
		t.Reported = Document{}
	}
	if t.Desired == nil {
		t.Desired = Document{}
	}
	if len(t.ReportedMeta) == 0 {
		t.ReportedMeta = nil
	}
	if len(t.DesiredMeta) == 0 {
		t.DesiredMeta = nil
	}
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)
	return t, nil
}

// decodeRecord decodes a twin's record, in either store format.
func decodeRecord(b []byte) (record, error) {
	if !isBinary(b) {
		return decodeRecordJSON(b)
	}
	r, err := parseRecord(b[1:])
	if err != nil {
		return record{}, fmt.Errorf("twin: corrupt record: %w", err)
	}
	return r, nil
}

func parseRecord(b []byte) (record, error) {
	var r record
	found := false
	for len(b) > 0 {
		f, rest, err := nextFieldOf(recordWire, b)
		if err != nil {
			return r, err
		}
		b = rest
		switch f.num {
		case recordTwin:
			t, err := parseTwin(f.bytes)
			if err != nil {
				return r, err
			}
			r.Twin, found = t, true
		case recordDeletion:
			r.Deleted, found = true, true
			for d := f.bytes; len(d) > 0; {
				g, rest, err := nextFieldOf(deletionWire, d)
				if err != nil {
					return r, err
				}
				d = rest
				switch g.num {
				case deletionLastVersion:
					r.LastVersion = g.int()
				case deletionLastCommandSeq:
					r.LastCommandSeq = g.int()
				}
			}
		case recordLogBase:
			r.Log.Base = f.int()
		case recordLogChain:
			r.Log.Chain = f.int()
		}
	}
	if !found {
		return r, errors.New("the record holds neither a twin nor a deletion")
	}
	return r, nil
}

// decodeLogEntry decodes a watch log entry, in either store format: its
// event with the twin, or, for an entry that holds a change, its event
// without the twin and the change (logReader rebuilds the twin).
func decodeLogEntry(b []byte) (*Event, *twinChange, error) {
	if !isBinary(b) {
		ev, err := decodeEventJSON(b)
		return ev, nil, err
	}
	ev, ch, err := parseEvent(b[1:])
	if err != nil {
		return nil, nil, fmt.Errorf("twin: corrupt event: %w", err)
	}
	return ev, ch, nil
}

func parseEvent(b []byte) (ev *Event, ch *twinChange, err error) {
	ev = new(Event)
	for len(b) > 0 {
		f, rest, err := nextFieldOf(eventWire, b)
		if err != nil {
			return nil, nil, err
		}
		b = rest
		switch f.num {
		case eventRevision:
			ev.Revision = f.int()
		case eventKind:
			ev.Kind = EventKind(f.u)
		case eventTime:
			ev.Time = f.time()
		case eventSource:
			ev.Source = Source(f.bytes)
		case eventPatch:
			ev.Patch, err = readDocument(f.bytes)
		case eventTwin:
			ev.Twin, err = parseTwin(f.bytes)
		case eventChange:
			ch, err = parseTwinChange(f.bytes)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	return ev, ch, nil
}

// eventHead is the part of a stored event that Check reads.
type eventHead struct {
	Revision int64
	Kind     EventKind
	TwinID   string
	Version  int64
	// Previous is, for an entry that holds a change, the revision of the
	// twin's entry it applies to; 0 for an entry with the whole twin.
	Previous int64
}

// decodeEventHead reads the revision and kind of a stored event and the id
// and version of its twin, in either store format, without decoding the
// twin's documents.
func decodeEventHead(b []byte) (eventHead, error) {
	if !isBinary(b) {
		return decodeEventHeadJSON(b)
	}
	var h eventHead
	for b = b[1:]; len(b) > 0; {
		f, rest, err := nextFieldOf(eventWire, b)
		if err != nil {
			return h, err
		}
		b = rest
		switch f.num {
		case eventRevision:
			h.Revision = f.int()
		case eventKind:
			h.Kind = EventKind(f.u)
		case eventTwin, eventChange:
			t := f.bytes
			if f.num == eventChange {
				t = nil
				for c := f.bytes; len(c) > 0; {
					g, rest, err := nextFieldOf(changeWire, c)
					if err != nil {
						return h, err
					}
					c = rest
					switch g.num {
					case changeHead:
						t = g.bytes
					case changePreviousRevision:
						h.Previous = g.int()
					}
				}
			}
			for len(t) > 0 {
				g, rest, err := nextFieldOf(twinWire, t)
				if err != nil {
					return h, err
				}
				t = rest
				switch g.num {
				case twinID:
					h.TwinID = string(g.bytes)
				case twinVersion:
					h.Version = g.int()
				}
			}
		}
	}
	return h, nil
}

// decodeCommand decodes a retained command, in either store format.
func decodeCommand(b []byte) (*Command, error) {
	if !isBinary(b) {
		return decodeCommandJSON(b)
	}
	c, err := parseCommand(b[1:])
	if err != nil {
		return nil, fmt.Errorf("twin: corrupt command: %w", err)
	}
	return c, nil
}

func parseCommand(b []byte) (*Command, error) {
	c := new(Command)
	for len(b) > 0 {
		f, rest, err := nextFieldOf(commandWire, b)
		if err != nil {
			return nil, err
		}
		b = rest
		switch f.num {
		case commandID:
			c.ID = string(f.bytes)
		case commandDeviceID:
			c.DeviceID = string(f.bytes)
		case commandSeq:
			c.Seq = f.int()
		case commandName:
			c.Name = string(f.bytes)
		case commandParams:
			c.Params, err = readDocument(f.bytes)
		case commandState:
			c.State = CommandState(f.u)
		case commandResult:
			c.Result, err = readDocument(f.bytes)
		case commandMessage:
			c.Message = string(f.bytes)
		case commandSource:
			c.Source = Source(f.bytes)
		case commandRequestID:
			c.RequestID = string(f.bytes)
		case commandTTL:
			c.TTL = time.Duration(f.int())
		case commandCreateTime:
			c.CreateTime = f.time()
		case commandUpdateTime:
			c.UpdateTime = f.time()
		case commandExpireTime:
			c.ExpireTime = f.time()
		}
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// decodeRuleState decodes a twin's state for a rule, in either store
// format.
func decodeRuleState(b []byte) (RuleState, error) {
	if !isBinary(b) {
		return decodeRuleStateJSON(b)
	}
	var s RuleState
	for b = b[1:]; len(b) > 0; {
		f, rest, err := nextFieldOf(ruleStateWire, b)
		if err != nil {
			return RuleState{}, fmt.Errorf("twin: corrupt rule state: %w", err)
		}
		b = rest
		switch f.num {
		case ruleStateGen:
			s.Gen = f.int()
		case ruleStateActive:
			s.Active = f.u != 0
		case ruleStatePendingSince:
			s.PendingSince = f.time()
		case ruleStateFired:
			s.Fired = f.u != 0
		case ruleStateLastFired:
			s.LastFired = f.time()
		}
	}
	return s, nil
}
