package audit

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
)

// OCSF mapping
//
// With JSONLConfig.OCSF, each line is an OCSF 1.1.0 "API Activity" event
// (class_uid 6003, category "Application Activity", category_uid 6)
// instead of the raw entry. The mapping from an [Entry] at index i:
//
//	activity_id, activity_name  from the last dotted part of op: create,
//	                            generate, import, encrypt, wrap → 1 Create;
//	                            get, read, list, decrypt, unwrap, release,
//	                            open, describe → 2 Read; update, rotate, set,
//	                            enable, disable, attach → 3 Update; delete,
//	                            destroy, revoke, disable_version → 4 Delete;
//	                            otherwise 99 Other
//	type_uid                    600300 + activity_id
//	time                        entry time, Unix milliseconds
//	severity_id, severity       allow → 1 Informational; deny → 3 Medium
//	status_id, status           allow → 1 Success; deny → 2 Failure
//	status_detail               reason
//	actor.user                  admin → {name: id, type: "Admin", type_id 2};
//	                            node → {name: id, type: "System", type_id 3}
//	actor.app_name              system → "coffre"
//	api.operation               op
//	api.service.name            "coffre"
//	api.request.uid             request_id
//	resources                   [{name: keyring, type: "keyring", version:
//	                            key_version}] when the entry names a keyring
//	metadata.product            {name: "Coffre", vendor_name: "Coffre"}
//	metadata.version            "1.1.0" (the OCSF schema version)
//	metadata.uid                node + "/" + index (unique across nodes)
//	metadata.sequence           index
//	metadata.log_name           "coffre-audit"
//	unmapped                    node, tenant, evidence hashes, actor kind,
//	                            entry version: Coffre fields OCSF has no
//	                            place for
//
// The raw entry is not repeated: the Merkle tree and signed checkpoints
// cover the raw log, not this view of it.

// OCSF constants of the mapping.
const (
	ocsfClassAPIActivity = 6003
	ocsfCategoryAppAct   = 6
	ocsfSchemaVersion    = "1.1.0"
)

type ocsfEvent struct {
	ClassUID     int            `json:"class_uid"`
	ClassName    string         `json:"class_name"`
	CategoryUID  int            `json:"category_uid"`
	CategoryName string         `json:"category_name"`
	ActivityID   int            `json:"activity_id"`
	ActivityName string         `json:"activity_name"`
	TypeUID      int            `json:"type_uid"`
	Time         int64          `json:"time"`
	SeverityID   int            `json:"severity_id"`
	Severity     string         `json:"severity"`
	StatusID     int            `json:"status_id"`
	Status       string         `json:"status"`
	StatusDetail string         `json:"status_detail,omitempty"`
	Actor        ocsfActor      `json:"actor"`
	API          ocsfAPI        `json:"api"`
	Resources    []ocsfResource `json:"resources,omitempty"`
	Metadata     ocsfMetadata   `json:"metadata"`
	Unmapped     ocsfUnmapped   `json:"unmapped"`
}

type ocsfActor struct {
	User    *ocsfUser `json:"user,omitempty"`
	AppName string    `json:"app_name,omitempty"`
}

type ocsfUser struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	TypeID int    `json:"type_id"`
}

type ocsfAPI struct {
	Operation string       `json:"operation"`
	Service   ocsfService  `json:"service"`
	Request   *ocsfRequest `json:"request,omitempty"`
}

type ocsfService struct {
	Name string `json:"name"`
}

type ocsfRequest struct {
	UID string `json:"uid"`
}

type ocsfResource struct {
	Name    string `json:"name"`
	Type    string `json:"type"`
	Version string `json:"version,omitempty"`
}

type ocsfMetadata struct {
	Product  ocsfProduct `json:"product"`
	Version  string      `json:"version"`
	UID      string      `json:"uid"`
	Sequence uint64      `json:"sequence"`
	LogName  string      `json:"log_name"`
}

type ocsfProduct struct {
	Name       string `json:"name"`
	VendorName string `json:"vendor_name"`
}

type ocsfUnmapped struct {
	Node         string   `json:"node"`
	Tenant       string   `json:"tenant,omitempty"`
	Evidence     []string `json:"evidence,omitempty"`
	ActorKind    string   `json:"actor_kind"`
	EntryVersion int      `json:"entry_version"`
}

var ocsfActivities = map[string]int{
	"create": 1, "generate": 1, "import": 1, "encrypt": 1, "wrap": 1,
	"get": 2, "read": 2, "list": 2, "decrypt": 2, "unwrap": 2, "release": 2, "open": 2, "describe": 2,
	"update": 3, "rotate": 3, "set": 3, "enable": 3, "disable": 3, "attach": 3,
	"delete": 4, "destroy": 4, "revoke": 4, "disable_version": 4,
}

var ocsfActivityNames = map[int]string{1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}

// ocsfActivity maps an operation such as "key.generate_data_key" or
// "admin.create_keyring" to an activity id: the first word of the last
// dotted part decides.
func ocsfActivity(op string) int {
	last := op[strings.LastIndexByte(op, '.')+1:]
	if id, ok := ocsfActivities[last]; ok {
		return id
	}
	verb, _, _ := strings.Cut(last, "_")
	if id, ok := ocsfActivities[verb]; ok {
		return id
	}
	return 99
}

// MarshalOCSF returns the OCSF "API Activity" view of the entry at index,
// as one line of JSON without the trailing newline.
func MarshalOCSF(e *Entry, index uint64) ([]byte, error) {
	if err := e.validate(); err != nil {
		return nil, err
	}
	act := ocsfActivity(e.Operation)
	ev := ocsfEvent{
		ClassUID:     ocsfClassAPIActivity,
		ClassName:    "API Activity",
		CategoryUID:  ocsfCategoryAppAct,
		CategoryName: "Application Activity",
		ActivityID:   act,
		ActivityName: ocsfActivityNames[act],
		TypeUID:      ocsfClassAPIActivity*100 + act,
		Time:         e.Time.UnixMilli(),
		SeverityID:   1,
		Severity:     "Informational",
		StatusID:     1,
		Status:       "Success",
		StatusDetail: e.Reason,
		API: ocsfAPI{
			Operation: e.Operation,
			Service:   ocsfService{Name: "coffre"},
		},
		Metadata: ocsfMetadata{
			Product:  ocsfProduct{Name: "Coffre", VendorName: "Coffre"},
			Version:  ocsfSchemaVersion,
			UID:      e.Node + "/" + strconv.FormatUint(index, 10),
			Sequence: index,
			LogName:  "coffre-audit",
		},
		Unmapped: ocsfUnmapped{
			Node:         e.Node,
			Tenant:       e.Tenant,
			Evidence:     e.EvidenceHashes,
			ActorKind:    e.Actor.Kind,
			EntryVersion: e.Version,
		},
	}
	if e.Decision == Deny {
		ev.SeverityID, ev.Severity = 3, "Medium"
		ev.StatusID, ev.Status = 2, "Failure"
	}
	switch e.Actor.Kind {
	case ActorAdmin:
		ev.Actor.User = &ocsfUser{Name: e.Actor.ID, Type: "Admin", TypeID: 2}
	case ActorNode:
		ev.Actor.User = &ocsfUser{Name: e.Actor.ID, Type: "System", TypeID: 3}
	default:
		ev.Actor.AppName = "coffre"
	}
	if e.RequestID != "" {
		ev.API.Request = &ocsfRequest{UID: e.RequestID}
	}
	if e.Keyring != "" {
		r := ocsfResource{Name: e.Keyring, Type: "keyring"}
		if e.KeyVersion != 0 {
			r.Version = strconv.FormatUint(uint64(e.KeyVersion), 10)
		}
		ev.Resources = []ocsfResource{r}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&ev); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
