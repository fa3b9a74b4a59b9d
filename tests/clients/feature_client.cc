// A C++ client of the feature server written from docs/protocol.md alone, with Arrow Flight C++:
// JSON requests in tickets, descriptors and action bodies; Arrow record batches back.
//
//   feature_client LOCATION tables [PREFIX]             list_flights: one JSON line per table
//   feature_client LOCATION health                      the `health` action's reply
//   feature_client LOCATION read OUT.arrow TABLE [PARTS] a whole table: get_flight_info, then every endpoint
//   feature_client LOCATION train OUT.arrow FEATURES COLUMN=V,V... ...
//                                                       a training set of inline entity rows
//   feature_client LOCATION online OUT.arrow FEATURES COLUMN=V,V... ...
//                                                       the latest features of a few entities
//   feature_client LOCATION write IN.arrow TABLE WRITE_ID ENTITY_KEY EVENT_TIME
//                                                       do_put the rows of an Arrow IPC file, print the reply
//
// FEATURES is "table:feature,table:feature"; values that are integers go as JSON numbers, others
// as strings (ISO-8601 timestamps included). Rows are written to OUT.arrow, an Arrow IPC file, and
// one JSON line describes them. A failed call prints {"error": {"status": ..., "message": ...,
// "detail": ...}} and exits with 1.
//
// Build against a system Arrow (recent Arrow releases need C++20, older ones C++17):
//   g++ -std=c++20 -O2 feature_client.cc -o feature_client $(pkg-config --cflags --libs arrow-flight)
#include <arrow/api.h>
#include <arrow/flight/api.h>
#include <arrow/io/file.h>
#include <arrow/ipc/api.h>

#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace fl = arrow::flight;

// A JSON string literal.
std::string Quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::vector<std::string> Split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t end; (end = text.find(separator, start)) != std::string::npos; start = end + 1) {
    parts.push_back(text.substr(start, end - start));
  }
  parts.push_back(text.substr(start));
  return parts;
}

bool IsInteger(const std::string& text) {
  size_t digits = text.rfind('-', 0) == 0 ? 1 : 0;
  return text.size() > digits && text.find_first_not_of("0123456789", digits) == std::string::npos;
}

// "a,b" -> ["a", "b"]; with `numbers`, integers become JSON numbers.
std::string JsonList(const std::string& csv, bool numbers) {
  std::string out = "[";
  for (const std::string& item : Split(csv, ',')) {
    out += (out.size() > 1 ? ", " : "") + (numbers && IsInteger(item) ? item : Quote(item));
  }
  return out + "]";
}

// {"driver_id": [1001, 1002], ...} from arguments "driver_id=1001,1002" ...
std::string Columns(const std::vector<std::string>& arguments) {
  std::string out = "{";
  for (const std::string& argument : arguments) {
    size_t equals = argument.find('=');
    out += (out.size() > 1 ? ", " : "") + Quote(argument.substr(0, equals)) + ": " +
           JsonList(argument.substr(equals + 1), true);
  }
  return out + "}";
}

// The rows of every endpoint, in order. An endpoint names the replicas that serve its ticket (the
// first, then fallbacks when one is UNAVAILABLE), or none: then the server that issued it does.
arrow::Result<std::shared_ptr<arrow::Table>> ReadEndpoints(fl::FlightClient& client, const fl::FlightInfo& info) {
  ARROW_ASSIGN_OR_RAISE(std::shared_ptr<arrow::Schema> schema, info.GetSchema(nullptr));
  std::vector<std::shared_ptr<arrow::Table>> parts;
  for (const fl::FlightEndpoint& endpoint : info.endpoints()) {
    std::vector<fl::Location> locations = endpoint.locations;
    if (locations.empty()) locations.push_back(fl::Location::ReuseConnection());
    arrow::Result<std::shared_ptr<arrow::Table>> part;
    for (const fl::Location& location : locations) {
      std::unique_ptr<fl::FlightClient> replica;
      if (!location.Equals(fl::Location::ReuseConnection())) {
        ARROW_ASSIGN_OR_RAISE(replica, fl::FlightClient::Connect(location));
      }
      auto stream = (replica ? *replica : client).DoGet(endpoint.ticket);
      part = stream.ok() ? (*stream)->ToTable() : stream.status();
      auto detail = fl::FlightStatusDetail::UnwrapStatus(part.status());
      if (part.ok() || !detail || detail->code() != fl::FlightStatusCode::Unavailable) break;
    }
    ARROW_RETURN_NOT_OK(part.status());
    parts.push_back(*part);
  }
  if (parts.empty()) return arrow::Table::MakeEmpty(schema);
  return arrow::ConcatenateTables(parts);
}

arrow::Status WriteFile(const std::string& path, const arrow::Table& rows) {
  ARROW_ASSIGN_OR_RAISE(auto file, arrow::io::FileOutputStream::Open(path));
  ARROW_ASSIGN_OR_RAISE(auto writer, arrow::ipc::MakeFileWriter(file, rows.schema()));
  ARROW_RETURN_NOT_OK(writer->WriteTable(rows));
  ARROW_RETURN_NOT_OK(writer->Close());
  return file->Close();
}

// get_flight_info on a command descriptor holding `request`, then every endpoint into `path`.
arrow::Status ReadInto(fl::FlightClient& client, const std::string& request, const std::string& path) {
  ARROW_ASSIGN_OR_RAISE(auto info, client.GetFlightInfo(fl::FlightDescriptor::Command(request)));
  ARROW_ASSIGN_OR_RAISE(auto rows, ReadEndpoints(client, *info));
  ARROW_RETURN_NOT_OK(WriteFile(path, *rows));
  std::cout << "{\"endpoints\": " << info->endpoints().size() << ", \"rows\": " << rows->num_rows()
            << ", \"app_metadata\": " << info->app_metadata() << "}\n";
  return arrow::Status::OK();
}

arrow::Status Tables(fl::FlightClient& client, const std::string& prefix) {
  ARROW_ASSIGN_OR_RAISE(auto listing, client.ListFlights({}, fl::Criteria{prefix}));
  while (true) {
    ARROW_ASSIGN_OR_RAISE(std::unique_ptr<fl::FlightInfo> info, listing->Next());
    if (!info) return arrow::Status::OK();
    std::cout << "{\"table\": " << Quote(info->descriptor().path.at(0))
              << ", \"total_records\": " << info->total_records() << ", \"app_metadata\": " << info->app_metadata()
              << "}\n";
  }
}

arrow::Status Health(fl::FlightClient& client) {
  ARROW_ASSIGN_OR_RAISE(auto results, client.DoAction(fl::Action{"health", nullptr}));
  ARROW_ASSIGN_OR_RAISE(std::unique_ptr<fl::Result> reply, results->Next());  // one JSON message
  std::cout << reply->body->ToString() << "\n";
  return results->Drain();
}

arrow::Status Online(fl::FlightClient& client, const std::string& path, const std::string& features,
                     const std::vector<std::string>& columns) {
  std::string request = R"({"v": 1, "kind": "online", "features": )" + JsonList(features, false) +
                        R"(, "entities": )" + Columns(columns) + "}";
  ARROW_ASSIGN_OR_RAISE(auto stream, client.DoGet(fl::Ticket{request}));  // keys inline: the ticket is the request
  ARROW_ASSIGN_OR_RAISE(auto rows, stream->ToTable());
  ARROW_RETURN_NOT_OK(WriteFile(path, *rows));
  std::cout << "{\"rows\": " << rows->num_rows() << "}\n";
  return arrow::Status::OK();
}

// One do_put: the rows, the end-of-stream marker, then the reply's app_metadata.
arrow::Status Write(fl::FlightClient& client, const std::string& input, const std::string& table,
                    const std::string& write_id, const std::string& entity_key, const std::string& event_time) {
  ARROW_ASSIGN_OR_RAISE(auto file, arrow::io::ReadableFile::Open(input));
  ARROW_ASSIGN_OR_RAISE(auto reader, arrow::ipc::RecordBatchFileReader::Open(file));
  ARROW_ASSIGN_OR_RAISE(auto rows, reader->ToTable());
  std::string request = R"({"v": 1, "kind": "write", "table": )" + Quote(table) + R"(, "write_id": )" +
                        Quote(write_id) + R"(, "entity_keys": [)" + Quote(entity_key) + R"(], "event_time": )" +
                        Quote(event_time) + R"(, "end_marker": true})";
  ARROW_ASSIGN_OR_RAISE(auto put, client.DoPut(fl::FlightDescriptor::Command(request), rows->schema()));
  std::string marker = R"({"end_of_stream": true, "rows": )" + std::to_string(rows->num_rows()) + "}";
  std::shared_ptr<arrow::Buffer> reply;
  arrow::Status sent = put.writer->WriteTable(*rows);
  if (sent.ok()) sent = put.writer->WriteMetadata(arrow::Buffer::FromString(marker));
  if (sent.ok()) sent = put.writer->DoneWriting();
  if (sent.ok()) sent = put.reader->ReadMetadata(&reply);
  arrow::Status closed = put.writer->Close();  // a refused put's explanation arrives here
  ARROW_RETURN_NOT_OK(closed);
  ARROW_RETURN_NOT_OK(sent);
  if (!reply) return arrow::Status::IOError("the server closed the put without a reply");
  std::cout << reply->ToString() << "\n";  // {"table", "snapshot_id", "rows", "files", "write_id", "duplicate"}
  return arrow::Status::OK();
}

arrow::Status Run(const std::vector<std::string>& args) {
  if (args.size() < 2) return arrow::Status::Invalid("usage: feature_client LOCATION COMMAND ARGS... (see the source)");
  ARROW_ASSIGN_OR_RAISE(auto location, fl::Location::Parse(args[0]));  // grpc://host:port, grpc+tls://...
  ARROW_ASSIGN_OR_RAISE(auto connected, fl::FlightClient::Connect(location));
  fl::FlightClient& client = *connected;
  const std::string& command = args[1];
  std::vector<std::string> rest(args.begin() + 2, args.end());
  if (command == "tables") return Tables(client, rest.empty() ? "" : rest[0]);
  if (command == "health") return Health(client);
  if (command == "read" && (rest.size() == 2 || (rest.size() == 3 && IsInteger(rest[2])))) {
    std::string parts = rest.size() == 3 ? R"(, "partitions": )" + rest[2] : "";
    return ReadInto(client, R"({"v": 1, "kind": "scan", "table": )" + Quote(rest[1]) + parts + "}", rest[0]);
  }
  if (command == "train" && rest.size() >= 3) {
    std::vector<std::string> columns(rest.begin() + 2, rest.end());
    return ReadInto(client,
                    R"({"v": 1, "kind": "historical", "features": )" + JsonList(rest[1], false) +
                        R"(, "entities": {"rows": )" + Columns(columns) + "}}",
                    rest[0]);
  }
  if (command == "online" && rest.size() >= 3) {
    return Online(client, rest[0], rest[1], std::vector<std::string>(rest.begin() + 2, rest.end()));
  }
  if (command == "write" && rest.size() == 5) return Write(client, rest[0], rest[1], rest[2], rest[3], rest[4]);
  return arrow::Status::Invalid("unknown command or wrong arguments: ", command);
}

// The gRPC status of a failed call. Arrow Flight C++ hands it over as an arrow::Status: INVALID_ARGUMENT
// as Invalid, NOT_FOUND as KeyError, the others with a FlightStatusDetail whose extra_info holds the
// server's JSON detail {"code": "<kind>"} (docs/protocol.md#errors).
std::string StatusName(const arrow::Status& status) {
  if (auto detail = fl::FlightStatusDetail::UnwrapStatus(status)) {
    switch (detail->code()) {
      case fl::FlightStatusCode::Internal: return "INTERNAL";
      case fl::FlightStatusCode::TimedOut: return "DEADLINE_EXCEEDED";
      case fl::FlightStatusCode::Cancelled: return "CANCELLED";
      case fl::FlightStatusCode::Unauthenticated: return "UNAUTHENTICATED";
      case fl::FlightStatusCode::Unauthorized: return "PERMISSION_DENIED";
      case fl::FlightStatusCode::Unavailable: return "UNAVAILABLE";
      case fl::FlightStatusCode::Failed: return "UNKNOWN";
    }
  }
  if (status.IsInvalid()) return "INVALID_ARGUMENT";
  if (status.IsKeyError()) return "NOT_FOUND";
  if (status.IsNotImplemented()) return "UNIMPLEMENTED";
  return "UNKNOWN";
}

int main(int argc, char** argv) {
  arrow::Status status = Run(std::vector<std::string>(argv + 1, argv + argc));
  if (status.ok()) return 0;
  auto detail = fl::FlightStatusDetail::UnwrapStatus(status);
  std::string message = status.message();  // the explanation, then ". Detail: " and notes of Arrow's
  std::cout << "{\"error\": {\"status\": " << Quote(StatusName(status))
            << ", \"message\": " << Quote(message.substr(0, message.find(". Detail: ")))
            << ", \"detail\": " << (detail ? Quote(detail->extra_info()) : "null") << "}}\n";
  return 1;
}
